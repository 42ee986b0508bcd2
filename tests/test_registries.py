"""Every entry of the stage registry (and of the registries `rakt run` offers as choices) has what the CLI and
`rakt run` need: a config, a `run`, a run-config section that `--set SECTION.KEY=...` accepts, and a bad value
refused when the run plans, before anything is written."""
from __future__ import annotations

import dataclasses

import pytest

from rakt.pipeline.config import ConfigError
from rakt.run.config import FILLED_BY_RUN, load_run_config
from rakt.run.plan import plan
from rakt.stages import STAGES, adapt_modes, kd_modes

# run configs under which each stage has a step (the default plans the others)
PLANNED_BY = {"carve": ["carve={source: fashion-mnist}"], "download": ["collect=download"],
              "sample": ["experiment.extra_arms=[random/task]"]}


def numeric_fields(config: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config) if f.type in ("int", "float", int, float)]


def planned(overrides: list[str], tmp_path) -> list:
    return plan(load_run_config(None, overrides, run_dir=str(tmp_path / "run")))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_has_a_config_a_run_and_a_checked_section(name, tmp_path, monkeypatch):
    monkeypatch.setenv("RAKT_DATA", str(tmp_path / "kit"))  # the plan reads no data
    stage = STAGES[name]
    assert dataclasses.is_dataclass(stage.config) and callable(stage.runner())
    base = PLANNED_BY.get(name, [])
    if name in FILLED_BY_RUN:  # the run sets all of it: a section is refused, saying where to set it
        key = dataclasses.fields(stage.config)[0].name
        with pytest.raises(ConfigError, match=f"'{name}' has no section.*{FILLED_BY_RUN[name].split()[0]}"):
            load_run_config(None, [f"{name}.{key}=1"])
        return
    steps = [s for s in planned(base, tmp_path) if s.stage == name]
    assert steps, f"no step of `rakt {name}` under {base or 'the default run config'}"
    with pytest.raises(ConfigError, match=rf"unknown key 'no_such_key' in '{name}' \(not a setting of `rakt {name}`\)"):
        load_run_config(None, [*base, f"{name}.no_such_key=1"])
    with pytest.raises(ConfigError, match=f"'{name}' is a section of settings, got 3"):
        load_run_config(None, [*base, f"{name}=3"])
    refused = []
    for key in numeric_fields(stage.config):  # a value of the wrong kind: refused at plan time, naming the step
        try:
            planned([*base, f"{name}.{key}=not-a-number"], tmp_path)
        except ConfigError as e:
            assert str(e).startswith("run config") and key in str(e), str(e)
            refused.append(key)
    assert refused, f"no bad value of rakt {name}'s settings was refused when the run planned"
    assert not (tmp_path / "run").exists()  # planning writes nothing


def test_every_kd_mode_and_adapt_mode_plans(tmp_path, monkeypatch):
    monkeypatch.setenv("RAKT_DATA", str(tmp_path / "kit"))
    for mode in kd_modes():
        assert any(s.stage == "distill" and s.config.mode == mode
                   for s in planned([f"experiment.arms=[retrieved/{mode}]"], tmp_path))
    for mode in adapt_modes():  # an open_clip teacher: the zero-shot head needs its text tower
        steps = planned([f"adapt.mode={mode}", "teacher.model=ViT-B-32", "teacher.pretrained=''"], tmp_path)
        assert [s for s in steps if s.stage == "adapt"][0].config.mode == mode


def test_every_family_of_choices_is_one_registry():
    """Stages, KD modes, adapt modes, curation rules, transfer sets, engines and index schemes are all kept by
    rakt.registry.Registry: one decorator, one duplicate check, one error for an unknown name listing the choices."""
    from rakt.distill.kd_modes import KD_MODES
    from rakt.distill.teacher.modes import ADAPT_MODES
    from rakt.indexes.registry import SCHEMES
    from rakt.pipeline.curate.rules import RULES
    from rakt.pipeline.engines import ENGINES
    from rakt.registry import Registry
    from rakt.rundir import TRANSFER_SETS

    families = {"stage": STAGES, "KD mode": KD_MODES, "adapt mode": ADAPT_MODES, "curation rule": RULES,
                "transfer set": TRANSFER_SETS, "engine": ENGINES, "index scheme": SCHEMES}
    for what, registry in families.items():
        assert isinstance(registry, Registry) and registry.what == what and len(registry) >= 1, what
        first = next(iter(registry))
        assert registry.lookup(first) is registry[first]
        with pytest.raises(registry.error, match=f"unknown {what} 'no-such'; choose one of: {first}"):
            registry.lookup("no-such")
        if not registry.replace:
            with pytest.raises(ValueError, match=f"{what} '{first}' is already registered"):
                registry.add(first, registry[first])


def test_a_registry_takes_entries_from_installed_packages(tmp_path, monkeypatch):
    """An entry-point group extends a registry: listed after the registered names, loaded on first lookup."""
    from rakt.registry import Registry

    dist = tmp_path / "plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rakt.test_choices]\nextra = json:dumps\nbroken = no_such_module:x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import json

    choices = Registry("choice", {"built-in": len}, entry_points="rakt.test_choices")
    assert choices.names() == ["built-in", "broken", "extra"] and choices.lookup("extra") is json.dumps
    with pytest.raises(ValueError, match="choice 'broken': entry point 'no_such_module:x'.*failed to load"):
        choices.lookup("broken")
