"""Evaluation metrics and `rakt evaluate` on a generated labelled shard."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from conftest import image_array, jpeg_bytes, write_shard
from rakt.distill.accuracy import decode_rgb, evaluate_model
from rakt.distill.students import create_student, save_student
from rakt.cli import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LabelReader(nn.Module):
    """Predicts the class written into pixel (0, 0) of channel 0 (value label / 10), shifted by `shift`."""

    def __init__(self, num_classes: int, shift: int = 0):
        super().__init__()
        self.num_classes, self.shift = num_classes, shift

    def forward(self, x):
        label = (x[:, 0, 0, 0] * 10).round().long()
        return nn.functional.one_hot((label + self.shift) % self.num_classes, self.num_classes).float()


def coded_images(labels: list[int]) -> torch.Tensor:
    images = torch.rand(len(labels), 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.float32) / 10
    return images


def test_perfect_model_scores_one_with_diagonal_confusion():
    labels = [0, 1, 2, 2, 1, 0, 2]
    images = coded_images(labels)
    result = evaluate_model(LabelReader(3), (images, torch.tensor(labels)), 3, batch_size=3)
    assert result["accuracy"] == 1.0 and result["count"] == 7
    assert result["per_class_accuracy"] == [1.0, 1.0, 1.0]
    assert result["confusion"] == [[2, 0, 0], [0, 2, 0], [0, 0, 3]]


def test_wrong_model_confusion_entries():
    labels = [0, 1, 2, 2, 1, 0, 2]
    batches = [(coded_images(labels[:4]), torch.tensor(labels[:4])),
               (coded_images(labels[4:]), torch.tensor(labels[4:]))]
    result = evaluate_model(LabelReader(4, shift=1), batches, 4)  # predicts label + 1; class 3 never occurs
    assert result["accuracy"] == 0.0 and result["count"] == 7
    assert result["confusion"] == [[0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 3], [0, 0, 0, 0]]
    assert result["per_class_accuracy"] == [0.0, 0.0, 0.0, None]
    half = evaluate_model(LabelReader(3), (coded_images([0, 1]), torch.tensor([0, 2])), 3)
    assert half["accuracy"] == 0.5 and half["confusion"] == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]


def test_evaluate_refuses_mismatched_classes():
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        evaluate_model(LabelReader(3), (coded_images([0]), torch.tensor([3])), 3)
    with pytest.raises(ValueError, match="gives 4 class scores"):
        evaluate_model(LabelReader(4), (coded_images([0]), torch.tensor([0])), 3)


def _samples() -> list[dict]:
    """10 labelled samples (7 in split test, 3 in train) of 2 classes, and one unlabelled test sample."""
    samples = [{"__key__": f"s{i:03d}", "jpg": jpeg_bytes(image_array(i, size=40)), "cls": i % 2,
                "json": {"split": "test" if i < 7 else "train"}} for i in range(10)]
    return samples + [{"__key__": "nolabel", "jpg": jpeg_bytes(image_array(99)), "json": {"split": "test"}}]


def _shard(tmp_path):
    """The shard of _samples() and its labelled test samples as (jpeg bytes, label)."""
    samples = _samples()
    test = [(s["jpg"], s["cls"]) for s in samples if "cls" in s and s["json"]["split"] == "test"]
    return write_shard(tmp_path / "target" / "test-000.tar", samples), test


def test_rakt_evaluate_writes_report(tmp_path, capsys):
    shard, test = _shard(tmp_path)
    torch.manual_seed(3)
    model = create_student("resnet10t", 2, small_input=True).eval()
    ckpt = tmp_path / "student.pt"
    save_student(ckpt, model, {"mode": "task"})
    out = tmp_path / "report" / "eval.json"
    rc = main(["evaluate", str(shard), "--checkpoint", str(ckpt), "--split", "test", "--device", "cpu",
               "--batch-size", "3", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    images = torch.stack([decode_rgb(data, 32) for data, _ in test])
    expected = evaluate_model(model, (images, torch.tensor([label for _, label in test])), 2)
    assert report["count"] == 7 and report["arch"] == "resnet10t"
    assert report["confusion"] == expected["confusion"] and report["accuracy"] == pytest.approx(expected["accuracy"])
    assert sum(map(sum, report["confusion"])) == 7 and len(report["per_class_accuracy"]) == 2
    assert report["skipped"] == {"other_split": 3, "no_label": 1}
    assert report["checkpoint_meta"] == {"mode": "task"}
    assert json.loads(capsys.readouterr().out)["count"] == 7
    assert not list(out.parent.glob(".*tmp*"))  # written atomically, no temp file left


def test_rakt_evaluate_clear_errors(tmp_path, capsys):
    shard, _ = _shard(tmp_path)
    ckpt = tmp_path / "student3.pt"
    save_student(ckpt, create_student("resnet10t", 3, small_input=True), {})
    (shard.parent / "classes.txt").write_text("cat\ndog\n")
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(shard), "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "source has 2 classes but the student resnet10t predicts 3" in capsys.readouterr().err
    assert main(["evaluate", str(shard), "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["evaluate", str(shard), "--out", str(out)]) == 2
    assert "checkpoint is required" in capsys.readouterr().err
    assert not out.exists()


def test_rakt_evaluate_bare_weights_with_model_flag(tmp_path):
    shard, test = _shard(tmp_path)
    (shard.parent / "classes.txt").write_text("cat\ndog\n")
    torch.manual_seed(4)
    model = create_student("resnet10t", 2, small_input=True).eval()
    torch.save(model.net.state_dict(), tmp_path / "bare.pt")
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(shard), "--checkpoint", str(tmp_path / "bare.pt"), "--model", "resnet10t",
                 "--small-input", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["classes"] == ["cat", "dog"] and report["count"] == 10  # every split
    images = torch.stack([decode_rgb(s["jpg"], 32) for s in _samples() if "cls" in s])
    labels = torch.tensor([s["cls"] for s in _samples() if "cls" in s])
    assert report["confusion"] == evaluate_model(model, (images, labels), 2)["confusion"]


def test_prefetched_keeps_order_raises_in_place_and_lets_go_early():
    """The background reader of evaluate and export: the same items in the same order; the producer's error
    after the items before it; a consumer that stops early leaves no producer thread behind."""
    import threading

    from rakt.pipeline.io import prefetched

    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield from range(3)
        raise ValueError("bad shard")

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [0, 1, 2]

    def endless():
        n = 0
        while True:
            yield n
            n += 1

    stream = prefetched(endless(), depth=1)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_rakt_evaluate_leaves_a_busy_neighbours_core_alone(tmp_path, caplog):
    """With a busy process pinned to one of its cores, `rakt evaluate` (auto threads) runs fewer intra-op threads
    than it has cores: an OpenMP team sharing that core would wait at every barrier for its descheduled thread."""
    shard, _ = _shard(tmp_path)
    ckpt = tmp_path / "student.pt"
    save_student(ckpt, create_student("resnet10t", 2, small_input=True), {"mode": "task"})
    cores = len(os.sched_getaffinity(0))
    busy = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"
    neighbour = subprocess.Popen([sys.executable, "-c", busy, str(min(os.sched_getaffinity(0)))])
    try:
        time.sleep(0.5)
        with caplog.at_level(logging.INFO, logger="rakt"):
            assert main(["evaluate", str(shard), "--checkpoint", str(ckpt), "--device", "cpu",
                         "--out", str(tmp_path / "eval.json")]) == 0
        used = torch.get_num_threads()
    finally:
        neighbour.kill()
        neighbour.wait()
    chosen = [int(m.split()[1]) for m in (r.getMessage() for r in caplog.records) if m.startswith("threads: ")]
    assert used <= cores - 1
    assert chosen == [used], caplog.text
