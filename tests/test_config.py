"""Stage configs: YAML + CLI overrides, validation with clear errors."""
from __future__ import annotations

import pytest

from rakt.cli import build_parser, main, stage_config
from rakt.pipeline.config import ConfigError, CurateConfig, config_hash, from_dict


def test_yaml_section_and_cli_override(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("curate:\n  budget: 500\n  balance: class\n  near_dup: 0.97\n")
    args = build_parser().parse_args(["curate", "cands", "--config", str(cfg_file), "--budget", "800", "--out", "o"])
    cfg = stage_config("curate", args)
    assert (cfg.budget, cfg.balance, cfg.near_dup, cfg.candidates, cfg.out) == (800, "class", 0.97, "cands", "o")


def test_unknown_key_names_the_file_and_suggests_the_right_one(tmp_path, capsys):
    cfg_file = tmp_path / "curate.yaml"
    cfg_file.write_text("bugdet: 500\nout: o\n")
    assert main(["curate", "cands", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert str(cfg_file) in err and "unknown key 'bugdet'" in err and "did you mean 'budget'" in err


def test_wrong_type_bad_choice_and_missing_out():
    with pytest.raises(ConfigError, match="'budget' must be int"):
        from_dict(CurateConfig, {"budget": "lots", "out": "o"})
    with pytest.raises(ConfigError, match="'balance' must be one of query, class"):
        from_dict(CurateConfig, {"balance": "classes", "out": "o"})
    with pytest.raises(ConfigError, match="'out' is required"):
        from_dict(CurateConfig, {"budget": 10})
    with pytest.raises(ConfigError, match="'dedup' must be true or false"):
        from_dict(CurateConfig, {"dedup": "maybe", "out": "o"})


def test_config_hash_tracks_values():
    a = from_dict(CurateConfig, {"out": "o", "budget": 100})
    assert config_hash(a) == config_hash(from_dict(CurateConfig, {"out": "o", "budget": 100}))
    assert config_hash(a) != config_hash(from_dict(CurateConfig, {"out": "o", "budget": 101}))


def test_missing_or_invalid_yaml_is_a_clear_error(tmp_path, capsys):
    assert main(["curate", "c", "--config", str(tmp_path / "nope.yaml"), "--out", "o"]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("budget: [1, 2\n")
    assert main(["curate", "c", "--config", str(bad), "--out", "o"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


@pytest.mark.parametrize("stage, key, value", [("curate", "budget", "72.9"), ("curate", "per_query_k", "true"),
                                               ("distill", "epochs", "2.5"), ("embed", "batch_size", "1e10000"),
                                               ("curate", "near_dup", ".nan"), ("curate", "leakage_threshold", "[1]")])
def test_a_number_that_does_not_fit_its_field_is_refused_not_cut(tmp_path, capsys, stage, key, value):
    cfg_file = tmp_path / "stage.yaml"
    cfg_file.write_text(f"{key}: {value}\nout: o\n")
    assert main([stage, "x", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg_file}: '{key}' must be" in err and "Traceback" not in err


def test_whole_numbers_still_read_as_ints():
    cfg = from_dict(CurateConfig, {"budget": 72.0, "per_query_k": "3", "near_dup": 1, "out": "o"})
    assert (cfg.budget, cfg.per_query_k, cfg.near_dup) == (72, 3, 1.0) and isinstance(cfg.budget, int)
    assert isinstance(cfg.near_dup, float)
