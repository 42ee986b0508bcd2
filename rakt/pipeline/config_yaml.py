"""Config files as YAML: one safe loader for run configs, stage configs and --set values (no aliases, no file over
1 MiB, no special file), and a dumper that writes no aliases."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rakt.pipeline.config import ConfigError
from rakt.pipeline.io import special_file


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of settings; a larger file is refused before it is read


class _NoAliases(yaml.SafeLoader):
    """safe_load without YAML aliases (`*name`, merge keys `<<: *name`): a few lines of nested aliases expand
    into billions of nodes once walked (an alias bomb), and a config never needs them."""

    def compose_node(self, parent, index):  # noqa: ANN001
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"found the alias *{event.anchor}: rakt configs take no "
                                              f"YAML aliases; write the value out", event.start_mark)
        return super().compose_node(parent, index)


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(obj: Any) -> str:
    """YAML that parse_yaml reads back: a value used twice is written out twice, never as an alias."""
    return yaml.dump(obj, Dumper=_NoAliasDumper, sort_keys=False)


def parse_yaml(text: str, where: str) -> Any:
    """One YAML document, safely and without aliases; a malformed one is a ConfigError naming `where`."""
    try:
        return yaml.load(text, Loader=_NoAliases)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a config") from None


def load_yaml(path: str | Path, section: str | None = None, what: str = "config file") -> dict:
    """Read a YAML config (a mapping); with `section`, return that stage's mapping. `what` names it in errors."""
    path = Path(path)
    kind = special_file(path)
    if kind is None and not path.exists():
        raise ConfigError(f"{what} not found: {path}")
    if kind is not None or path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: a {what} must be a regular file of at most {MAX_CONFIG_BYTES >> 20} MiB, "
                          f"this one is {kind or f'{path.stat().st_size} bytes'}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the {what} ({getattr(e, 'strerror', None) or e})") from None
    data = parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    if section is not None and section in data and isinstance(data[section], dict):
        data = data[section]
    return data
