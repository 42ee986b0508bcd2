"""`rakt labelled`: the few-shot draw written as one shard; hostile samples are counted skips, never a crash."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

from conftest import png_bomb
from rakt.cli import main

CLASSES = ["ant", "bee"]


def train_shard(tmp_path: Path, make_shard, make_images, to_jpeg, extra: list[dict]) -> Path:
    samples = [{"__key__": f"s{i:03d}", "jpg": to_jpeg(make_images(i, size=16)), "cls": i % 2} for i in range(6)]
    shard = make_shard(tmp_path / "target" / "train-000000.tar", samples + extra)
    (shard.parent / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    return shard


def members(shard: Path) -> set[str]:
    with tarfile.open(shard) as tar:
        return {m.name for m in tar}


def test_decompression_bomb_is_a_counted_skip(tmp_path, make_shard, make_images, to_jpeg, capsys):
    bomb = {"__key__": "bomb", "png": png_bomb(20000, 20000), "cls": 0}  # 400 Mpx: over PIL's 2 x 89 Mpx limit
    shard = train_shard(tmp_path, make_shard, make_images, to_jpeg, [bomb])
    assert main(["labelled", str(shard), "--out", str(tmp_path / "labelled")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 6 and summary["skipped"] == {"undecodable_image": 1}
    assert not any(name.startswith("bomb.") for name in members(tmp_path / "labelled" / "labelled-000000.tar"))


def test_sample_without_cls_is_counted_and_reported(tmp_path, make_shard, make_images, to_jpeg, capsys, caplog):
    bare = [{"__key__": f"bare{i}", "jpg": to_jpeg(make_images(50 + i, size=16))} for i in range(2)]
    shard = train_shard(tmp_path, make_shard, make_images, to_jpeg, bare)
    assert main(["labelled", str(shard), "--out", str(tmp_path / "labelled")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 6 and summary["skipped"] == {"no_label": 2}
    assert "bare0: no label" in caplog.text
    names = members(tmp_path / "labelled" / "labelled-000000.tar")
    assert len(names) == 18 and not any(name.startswith("bare") for name in names)


def test_classes_txt_with_a_duplicate_name_is_refused(tmp_path, make_shard, make_images, to_jpeg, capsys):
    shard = train_shard(tmp_path, make_shard, make_images, to_jpeg, [])
    (shard.parent / "classes.txt").write_text("ant\nbee\nant\n")
    assert main(["labelled", str(shard), "--out", str(tmp_path / "labelled")]) == 2
    err = capsys.readouterr().err
    assert f"{shard.parent / 'classes.txt'}: class 'ant' appears twice (lines 1 and 3)" in err
    assert not (tmp_path / "labelled").exists()
