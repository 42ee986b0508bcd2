"""Readers of target/pool images: folders, manifests, shards, few-shot draws and their error policies."""
from __future__ import annotations

import collections
import os

import pandas as pd
import pytest

from rakt.pipeline.io import InputError
from rakt.pipeline.sources import open_source


def read_all(source) -> tuple[list, collections.Counter]:
    stats: collections.Counter = collections.Counter()
    samples = [s for p in source.partitions for s in source.read(p, stats)]
    return samples, stats


def shard_samples(make_images, to_jpeg, n: int, prefix: str = "s", split: str = "train") -> list[dict]:
    return [{"__key__": f"{prefix}{i:04d}", "jpg": to_jpeg(make_images(i)), "cls": i % 3,
             "json": {"split": split}} for i in range(n)]


@pytest.fixture
def folder(tmp_path, make_folder, make_images):
    root = make_folder(tmp_path / "imgs", {c: [make_images(10 * k + i) for i in range(3)]
                                           for k, c in enumerate(["cat", "ant", "bee"])})
    (root / "loose.jpg").write_bytes((root / "cat" / "cat_0000.jpg").read_bytes())
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_labels_ids_and_partitions(folder):
    source = open_source([str(folder)], partition_size=4)
    assert source.classes == ["ant", "bee", "cat"]
    assert [p.name for p in source.partitions] == ["00000", "00001", "00002"]
    assert [len(p.files) for p in source.partitions] == [4, 4, 2]
    samples, stats = read_all(source)
    assert not stats
    ids = [s.id for s in samples]
    assert ids == sorted(ids) and ids[0] == "ant/ant_0000.jpg" and "loose.jpg" in ids
    by_id = {s.id: s for s in samples}
    assert by_id["cat/cat_0002.jpg"].label == 2 and by_id["ant/ant_0001.jpg"].label == 0
    assert by_id["loose.jpg"].label is None and by_id["loose.jpg"].split is None
    assert by_id["bee/bee_0000.jpg"].locator == {"path": str(folder / "bee" / "bee_0000.jpg")}
    assert by_id["loose.jpg"].image == (folder / "loose.jpg").read_bytes()  # bytes as stored
    assert source.locator_columns == ["path"]


def test_classes_file_overrides_folder_names(folder, tmp_path):
    classes = tmp_path / "names.txt"
    classes.write_text("bee\ncat\nant\ndog\n")
    samples, _ = read_all(open_source([str(folder)], classes_file=str(classes)))
    assert {s.id.split("/")[0]: s.label for s in samples if "/" in s.id} == {"bee": 0, "cat": 1, "ant": 2}
    classes.write_text("bee\ncat\n")
    with pytest.raises(InputError, match="'ant' is not in the classes list"):
        open_source([str(folder)], classes_file=str(classes))


def test_csv_manifest(tmp_path, folder):
    (tmp_path / "classes.txt").write_text("ant\nbee\ncat\n")
    manifest = tmp_path / "list.csv"
    pd.DataFrame({
        "path": ["imgs/cat/cat_0000.jpg", str(folder / "ant" / "ant_0001.jpg"), "imgs/bee/bee_0002.jpg",
                 "imgs/loose.jpg"],
        "label": ["2", "ant", "bee", None],
        "url": ["http://x/1.jpg", "http://x/2.jpg", None, "http://x/4.jpg"],
        "caption": ["a cat", "an ant", "a bee", "loose"],
        "split": ["train", "test", None, "train"],
    }).to_csv(manifest, index=False)
    source = open_source([str(manifest)])
    assert source.classes == ["ant", "bee", "cat"]
    assert source.locator_columns == ["path", "url", "caption"]
    samples, stats = read_all(source)
    assert not stats
    assert [s.id for s in samples] == ["imgs/cat/cat_0000.jpg", str(folder / "ant" / "ant_0001.jpg"),
                                       "imgs/bee/bee_0002.jpg", "imgs/loose.jpg"]
    assert [s.label for s in samples] == [2, 0, 1, None]
    assert [s.split for s in samples] == ["train", "test", None, "train"]
    assert samples[0].locator == {"path": str(folder / "cat" / "cat_0000.jpg"), "url": "http://x/1.jpg",
                                  "caption": "a cat"}
    assert samples[2].locator["url"] is None


def test_parquet_manifest_and_bad_label(tmp_path, folder):
    manifest = tmp_path / "list.parquet"
    pd.DataFrame({"path": ["imgs/cat/cat_0001.jpg", "imgs/ant/ant_0000.jpg", "imgs/bee/bee_0001.jpg"],
                  "label": [2, 7, 1]}).to_parquet(manifest)
    classes = tmp_path / "c.txt"
    classes.write_text("ant\nbee\ncat\n")
    samples, stats = read_all(open_source([str(manifest)], classes_file=str(classes)))
    assert [(s.id, s.label) for s in samples] == [("imgs/cat/cat_0001.jpg", 2), ("imgs/bee/bee_0001.jpg", 1)]
    assert stats == {"bad_label": 1}  # 7 names no class


def test_manifest_missing_file_names_the_row(tmp_path, folder):
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\nimgs/cat/cat_0000.jpg,0\nimgs/cat/gone.jpg,0\n")
    with pytest.raises(InputError) as err:
        open_source([str(manifest)])
    msg = str(err.value)
    assert str(manifest) in msg and "row 2" in msg and "imgs/cat/gone.jpg" in msg
    assert "remove the row or fix the path" in msg


def test_manifest_class_names_need_classes(tmp_path, folder):
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\nimgs/cat/cat_0000.jpg,cat\n")
    with pytest.raises(InputError, match="--classes"):
        open_source([str(manifest)])


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_shard_file(tmp_path, make_shard, make_images, to_jpeg, suffix):
    samples = shard_samples(make_images, to_jpeg, 7, split="test")
    samples[3]["cls"] = "seven"  # not an index: a counted skip
    del samples[5]["json"]
    shard = make_shard(tmp_path / f"a-000000{suffix}", samples)
    source = open_source([str(shard)])
    assert source.classes is None and source.locator_columns == ["shard", "key"]
    assert [(p.name, p.files) for p in source.partitions] == [("00000", [str(shard)])]
    got, stats = read_all(source)
    assert [s.id for s in got] == ["s0000", "s0001", "s0002", "s0004", "s0005", "s0006"]
    assert [s.label for s in got] == [0, 1, 2, 1, 2, 0]
    assert [s.split for s in got] == ["test", "test", "test", "test", None, "test"]
    assert got[0].image == samples[0]["jpg"]
    assert got[0].locator == {"shard": str(shard), "key": "s0000"}
    assert stats == {"bad_label": 1}


def test_shard_brace_pattern_directory_and_classes_txt(tmp_path, make_shard, make_images, to_jpeg):
    shards = tmp_path / "shards"
    for i in range(3):
        make_shard(shards / f"t-{i:06d}.tar.gz", shard_samples(make_images, to_jpeg, 2, prefix=f"k{i}_"))
    (shards / "classes.txt").write_text("zero\none\ntwo\n")
    by_brace = open_source([str(shards / "t-{000000..000002}.tar.gz")])
    by_dir = open_source([str(shards)])
    assert by_brace.partitions == by_dir.partitions
    assert [p.name for p in by_dir.partitions] == ["00000", "00001", "00002"]
    assert by_dir.classes == ["zero", "one", "two"]
    samples, _ = read_all(by_dir)
    assert [s.id for s in samples] == ["k0_0000", "k0_0001", "k1_0000", "k1_0001", "k2_0000", "k2_0001"]
    with pytest.raises(InputError, match="1 of 4 shards not found"):
        open_source([str(shards / "t-{000000..000003}.tar.gz")])


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar"])
def test_truncated_shard_keeps_samples_before_the_break(tmp_path, make_shard, make_images, to_jpeg, suffix):
    # many cuts, so that some fall on a header (where tarfile alone stops silently), some between the
    # members of one sample (its .jpg but no .cls/.json) and some inside a member's data
    samples = shard_samples(make_images, to_jpeg, 20)
    whole = make_shard(tmp_path / f"whole{suffix}", samples).read_bytes()
    kept = []
    for cut in range(5, 100, 3):
        broken = tmp_path / f"broken-{cut}{suffix}"
        broken.write_bytes(whole[:len(whole) * cut // 100])
        got, stats = read_all(open_source([str(broken)]))
        assert stats == {"truncated_shard": 1} or len(got) == 20, cut  # a cut in the end padding loses nothing
        assert [(g.id, g.image, g.label, g.split) for g in got] == [
            (s["__key__"], s["jpg"], s["cls"], "train") for s in samples[:len(got)]], cut
        kept.append(len(got))
    assert kept == sorted(kept) and kept[-1] >= 15


def test_unreadable_files_are_counted_skips(folder):
    os.symlink(folder / "nowhere.jpg", folder / "cat" / "dangling.jpg")
    (folder / "ant" / "dir.jpg").mkdir()
    samples, stats = read_all(open_source([str(folder)]))
    assert stats == {"unreadable_file": 2}
    assert len(samples) == 10 and "cat/dangling.jpg" not in {s.id for s in samples}


def test_per_class_draw_is_balanced_deterministic_and_partition_free(tmp_path, make_folder, make_images):
    root = make_folder(tmp_path / "imgs", {c: [make_images(i) for i in range(n)]
                                           for c, n in [("a", 9), ("b", 7), ("c", 2)]})
    (root / "unlabelled.jpg").write_bytes((root / "a" / "a_0000.jpg").read_bytes())

    def draw(**kw):
        samples, _ = read_all(open_source([str(root)], per_class=3, **kw))
        return [s.id for s in samples], collections.Counter(s.label for s in samples)

    ids, counts = draw(seed=1, partition_size=2)
    assert counts == {0: 3, 1: 3, 2: 2}  # class c has only 2
    assert draw(seed=1, partition_size=1000)[0] == ids
    assert draw(seed=1, partition_size=2)[0] == ids
    assert draw(seed=2)[0] != ids


def test_per_class_draw_over_shards(tmp_path, make_shard, make_images, to_jpeg):
    for i in range(2):
        make_shard(tmp_path / "s" / f"p-{i:06d}.tar", shard_samples(make_images, to_jpeg, 12, prefix=f"x{i}_"))
    source = open_source([str(tmp_path / "s")], per_class=2, seed=5)
    samples, stats = read_all(source)
    assert not stats
    assert collections.Counter(s.label for s in samples) == {0: 2, 1: 2, 2: 2}
    assert len(source.partitions) == 2  # still one partition per shard
    again, _ = read_all(open_source([str(tmp_path / "s")], per_class=2, seed=5))
    assert [s.id for s in again] == [s.id for s in samples]


def test_empty_and_unknown_sources(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images found"):
        open_source([str(empty)])
    with pytest.raises(InputError, match="source not found.*accepted sources"):
        open_source([str(tmp_path / "nope")])
    (tmp_path / "data.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="accepted sources"):
        open_source([str(tmp_path / "data.bin")])
