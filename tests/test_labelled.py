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


def test_every_labelled_image_reader_skips_alike(tmp_path, make_shard, make_images, to_jpeg, capsys):
    """`rakt labelled`, adapt's image reader, the image bank (distill, finetune) and evaluate's batches read images
    through one reader (rakt/pipeline/decoded.py): the same hostile samples give the same counted skips."""
    import collections

    from rakt.distill.accuracy import labelled_batches
    from rakt.distill.image_bank import open_bank
    from rakt.distill.teacher.inputs import load_images
    from rakt.pipeline.sources import open_source

    hostile = [{"__key__": "bare", "jpg": to_jpeg(make_images(40, size=16))},  # no .cls
               {"__key__": "broken", "jpg": b"\xff\xd8 not a jpeg", "cls": 0},
               {"__key__": "strip", "png": png_bomb(1, 5000), "cls": 1}]  # 1 x 5,000: extreme aspect ratio
    shard = str(train_shard(tmp_path, make_shard, make_images, to_jpeg, hostile))
    want = {"no_label": 1, "undecodable_image": 1, "extreme_aspect_ratio": 1}
    assert main(["labelled", shard, "--out", str(tmp_path / "labelled")]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == want
    assert load_images([shard], size=16).skipped == want
    assert open_bank([shard], 16, labelled_only=True, keep_decoded=False).skipped == want
    skipped: collections.Counter = collections.Counter()
    batches = list(labelled_batches(open_source([shard]), "", 16, 4, skipped))
    assert sum(len(labels) for _, labels in batches) == 6 and dict(skipped) == want
    import rakt.distill.accuracy
    import rakt.distill.image_bank
    import rakt.distill.teacher.inputs
    import rakt.pipeline.labelled

    for module in (rakt.pipeline.labelled, rakt.distill.teacher.inputs, rakt.distill.image_bank, rakt.distill.accuracy):
        assert "skip_cause" not in Path(module.__file__).read_text(), f"{module.__name__} counts skips itself"
