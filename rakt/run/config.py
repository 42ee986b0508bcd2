"""The run config of `rakt run`: the embedded default (or a `base:`) deep-merged with the user's file, then the
`--set KEY.SUB=VALUE` overrides; unknown keys and arm names are refused before anything is written."""
from __future__ import annotations

import copy
import difflib
import os
from importlib import resources
from pathlib import Path
from dataclasses import fields
from typing import Any


from rakt.pipeline.config import ConfigError
from rakt.pipeline.config_yaml import load_yaml, parse_yaml
from rakt.pipeline.io import InputError
from rakt.rundir import arm_runs
from rakt.stages import STAGES

CONFIGS = Path(str(resources.files("rakt.pipeline") / "configs"))
REQUIRED = {"target": ("train", "test", "per_class", "seed")}  # keys the plan reads from sections with no stage
# stages whose every setting the run fills itself: no section of their own, and where their settings come from
FILLED_BY_RUN = {"labelled": "target.per_class and target.seed", "init": "distill.student, distill.image_size, "
                 "distill.small_input and the arm's seed"}


def default_config_path() -> Path:
    return CONFIGS / "default.yaml"


def load_run_config(path: str | None, overrides: list[str] = (), run_dir: str = "") -> dict:
    """The run config: the embedded default (or `base:`) deep-merged with the file, then `--set` overrides."""
    base = _read_yaml(default_config_path())
    if path and not os.path.exists(path) and (CONFIGS / f"{path}.yaml").exists():
        path = str(CONFIGS / f"{path}.yaml")  # an embedded config by name: default, experiment
    if path:
        own = _read_yaml(Path(path))
        parent = own.pop("base", "default")
        if parent and parent != "default":
            base = load_run_config(str(Path(path).parent / parent))
        base = _merge(base, own)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY.SUB=VALUE, e.g. --set distill.epochs=3")
        try:
            parsed = parse_yaml(value, f"--set {item!r}: the value")
        except ConfigError as e:
            raise ConfigError(f"{e}; quote the whole KEY=VALUE and close every bracket, e.g. "
                              f"--set 'curate={{budget: 36}}'") from None
        _set_key(base, key.strip().split("."), parsed)
    if run_dir:
        base["run_dir"] = run_dir
    _check_keys(base)
    return base


def read_run_config(run_dir: str | Path) -> dict:
    """The resolved config a run directory was last run with (its run.yaml)."""
    if not (Path(run_dir) / "run.yaml").exists():
        raise InputError(f"{run_dir}: no run.yaml; is this a run directory of `rakt run`?")
    return {**_read_yaml(Path(run_dir) / "run.yaml"), "run_dir": str(run_dir)}


def expand(value: Any, subs: dict[str, str]) -> Any:
    """`value` with every ${KEY} in its strings replaced by subs[KEY]."""
    if isinstance(value, str):
        for key, sub in subs.items():
            value = value.replace("${" + key + "}", sub)
        return value
    if isinstance(value, list):
        return [expand(v, subs) for v in value]
    if isinstance(value, dict):
        return {k: expand(v, subs) for k, v in value.items()}
    return value


def _read_yaml(path: Path) -> dict:
    return load_yaml(path, what="run config")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_key(cfg: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        cfg = cfg.setdefault(key, {})
        if not isinstance(cfg, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: '{key}' is not a section")
    cfg[keys[-1]] = value


def _check_keys(cfg: dict) -> None:
    """Top-level keys: the default's shared sections and one section per stage of the registry (STAGES); a stage
    section's keys: its config's fields. Values are the stage configs' own business, checked when the run plans."""
    default = _read_yaml(default_config_path())
    known = set(default) | set(STAGES)
    _refuse_unknown(set(cfg) - known, known, "run config: unknown key '{}'")
    for key in default:
        _check_shape(cfg, default, key, key)
    for name, where in FILLED_BY_RUN.items():
        if name in cfg:
            raise ConfigError(f"run config: '{name}' has no section: `rakt run` sets every setting of `rakt {name}` "
                              f"from {where}; set those instead")
    for name, stage in STAGES.items():
        if name in FILLED_BY_RUN or name not in cfg:
            continue
        if name not in default:  # a stage section the default leaves out: a mapping as well
            _check_shape(cfg, {name: {}}, name, name)
        fields_ = {f.name for f in fields(stage.config)}
        _refuse_unknown(set(cfg[name]) - fields_, fields_,
                        f"run config: unknown key '{{}}' in '{name}' (not a setting of `rakt {name}`)")
    arm_runs(cfg)  # checks every arm name


def _refuse_unknown(unknown: set, known: set, message: str) -> None:
    if unknown:
        first = sorted(unknown)[0]
        hint = difflib.get_close_matches(first, known, n=1)
        raise ConfigError(message.format(first) + (f"; did you mean '{hint[0]}'?" if hint else
                                                   f"; known keys: {', '.join(sorted(known))}"))


def _check_shape(cfg: dict, default: dict, key: str, name: str) -> None:
    """A section (a mapping in the default) must stay a mapping (an empty one, e.g. `embed:`, reads as {}) and hold
    its REQUIRED keys, a list a list; the stage configs check the values themselves."""
    value, like = cfg.get(key), default[key]
    if isinstance(like, dict):
        if value is None and not like:
            cfg[key] = value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"run config: '{name}' is a section of settings, got {value!r}; set one of its keys "
                              f"(e.g. --set {name}.KEY=VALUE) or give a mapping ({name}: {{KEY: VALUE}})")
        for sub in like:
            if sub not in value and sub in REQUIRED.get(name, ()):
                raise ConfigError(f"run config: '{name}.{sub}' is missing (--set {name}=... replaces the whole "
                                  f"section); set single keys with --set {name}.KEY=VALUE")
            if sub in value:
                _check_shape(value, like, sub, f"{name}.{sub}")
    elif isinstance(like, list) and not isinstance(value, (list, str)):
        raise ConfigError(f"run config: '{name}' must be a list, e.g. {name}: {like!r}, got {value!r}")
    elif isinstance(like, str) and "." not in name and not isinstance(value, str):
        raise ConfigError(f"run config: '{name}' must be a string, e.g. {name}: {like!r}, got {value!r}")
