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
