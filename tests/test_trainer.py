"""The trainer: distill / finetune runs, kill-and-resume, bad shards, wrong checkpoints, class-count checks.

Tiny and CPU-only: a resnet10t student with the 32-px stem, a teacher made with distill.teacher over the
tiny (random-init, seeded) open_clip config, shards of generated images.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import image_array, jpeg_bytes, write_shard
from rakt.distill.image_bank import open_bank
from rakt.distill.batches import ViewSpec, bank_batches
from rakt.distill.distill import run as run_distill
from rakt.distill.finetune import run as run_finetune
from rakt.distill.students import load_student
from rakt.distill.teacher.checkpoint import save_teacher
from rakt.distill.teacher.modes import build_teacher
from rakt.distill.config import DistillConfig, FinetuneConfig
from rakt.pipeline.config import EncoderConfig
from rakt.pipeline.io import InputError

CLASSES = ["ant", "bee", "cat"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tiny_clip, tmp_path_factory) -> dict[str, Path]:
    """teacher.pt (3 classes), transfer/ (2 shards x 24 images), target/ (labelled shard + classes.txt)."""
    root = tmp_path_factory.mktemp("trainer")
    torch.manual_seed(0)
    teacher = build_teacher(EncoderConfig(model=tiny_clip, pretrained="", device="cpu"), len(CLASSES), "linear",
                            logit_scale=10.0)
    with torch.no_grad():
        teacher.head.weight.copy_(torch.randn_like(teacher.head.weight))
    save_teacher(root / "teacher.pt", teacher, {"encoder": {"model": tiny_clip, "pretrained": "", "image_size": 0},
                                                "model_id": teacher.model_id, "mode": "linear", "classes": CLASSES})
    for s in range(2):
        write_shard(root / "transfer" / f"shard-{s:05d}.tar",
                    [{"__key__": f"{s}-{i:04d}", "jpg": jpeg_bytes(image_array(100 * s + i, 40)), "json": {"i": i}}
                     for i in range(24)])
    write_shard(root / "target" / "train.tar",
                [{"__key__": f"t{i:03d}", "jpg": jpeg_bytes(image_array(1000 + i, 32)), "cls": i % 3}
                 for i in range(12)])
    (root / "target" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return {"root": root, "teacher": root / "teacher.pt", "transfer": root / "transfer", "target": root / "target"}


def distill_cfg(world: dict, out: Path, **kw) -> DistillConfig:
    base = dict(transfer=[str(world["transfer"])], teacher=str(world["teacher"]), student="resnet10t",
                small_input=True, image_size=32, epochs=3, batch_size=16, lr=3e-3, warmup=1,
                device="cpu", checkpoint_every=2, out=str(out))
    base.update(kw)
    return DistillConfig(**base)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def distilled(world, tmp_path_factory, one_torch_thread) -> Path:
    out = tmp_path_factory.mktemp("distill") / "run"
    summary = run_distill(distill_cfg(world, out, epochs=4))
    assert summary["steps"] == 12 and summary["transfer_samples"] == 48
    return out


def test_distill_runs_and_loss_decreases(distilled):
    rows = metrics(distilled)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"kd", "loss", "lr", "images_per_s", "grad_norm"} <= set(rows[0])
    first, last = sum(r["kd"] for r in rows[:3]) / 3, sum(r["kd"] for r in rows[-3:]) / 3
    assert last < first, (first, last)
    student, meta = load_student(distilled / "student.pt")
    assert student.arch == "resnet10t" and student.num_classes == 3 and meta["stage"] == "distill"
    assert (distilled / "checkpoint.pt").is_file() and (distilled / "summary.json").is_file()


def test_distill_with_labelled_target_mixed_in(world, tmp_path, one_torch_thread):
    out = tmp_path / "mixed"
    summary = run_distill(distill_cfg(world, out, epochs=1, target=[str(world["target"])], mode="progressive",
                                      target_mix="step"))
    assert summary["steps"] == 3
    rows = metrics(out)
    assert {"kd", "feature", "ce"} <= set(rows[0]) and rows[0]["ce"] > 0


def test_distill_with_labelled_target_joined_to_the_transfer_set(world, tmp_path, one_torch_thread):
    out = tmp_path / "joined"
    summary = run_distill(distill_cfg(world, out, epochs=1, target=[str(world["target"])], cache_teacher=True,
                                      teacher_view="clean", augment="shift"))
    assert summary["transfer_samples"] == 48 and summary["target_samples"] == 12
    assert summary["steps"] == 4  # 48 + 12 images in batches of 16
    rows = metrics(out)
    assert "ce" not in rows[0] and all(r["kd"] > 0 for r in rows)


def test_finetune_from_the_distilled_student(distilled, world, tmp_path, one_torch_thread):
    out = tmp_path / "ft"
    summary = run_finetune(FinetuneConfig(student=str(distilled / "student.pt"), target=[str(world["target"])],
                                          epochs=2, batch_size=4, lr=1e-4, device="cpu", out=str(out)))
    assert summary["steps"] == 6 and summary["target_images"] == 12
    rows = metrics(out)
    assert all("ce" in r for r in rows)
    student, meta = load_student(out / "student.pt")
    assert meta["stage"] == "finetune" and student.num_classes == 3
    before, _ = load_student(distilled / "student.pt")
    assert not torch.equal(before.state_dict()["net.fc.weight"], student.state_dict()["net.fc.weight"])


RESUME_RUN = dict(epochs=2, batch_size=4, lr=3e-3, warmup=2, ema=0.9, checkpoint_every=3)  # 24 steps


def _cli(world: dict, out: Path, mix: str = "none") -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**RESUME_RUN, "mix": mix}.items()]
    return [sys.executable, "-m", "rakt.cli", "distill", str(world["transfer"]), "--teacher", str(world["teacher"]),
            "--student", "resnet10t", "--small-input", "--image-size", "32", "--device", "cpu",
            *flags, "--out", str(out)]


@pytest.mark.parametrize("mix", ["none", "both"])
def test_kill_and_resume_matches_an_uninterrupted_run(world, tmp_path, one_torch_thread, mix):
    """SIGKILL the CLI after its first checkpoint, rerun it: the same student as one uninterrupted run (with mixed
    batches too: each batch's mix is redrawn from (seed, epoch))."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = subprocess.Popen(_cli(world, killed, mix), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    at_kill = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < at_kill < 24
    subprocess.run(_cli(world, killed, mix), cwd=ROOT, env=env, check=True, capture_output=True)
    run_distill(distill_cfg(world, full, **RESUME_RUN, mix=mix))  # uninterrupted, in process (1 thread)
    a, _ = load_student(full / "student.pt")
    b, _ = load_student(killed / "student.pt")
    for name, value in a.state_dict().items():
        assert torch.allclose(value.float(), b.state_dict()[name].float(), atol=1e-4, rtol=1e-3), name
    steps = [r["step"] for r in metrics(killed)]
    assert steps[-1] == 24 and set(steps) == set(range(1, 25))


def test_prepare_shows_the_online_teacher_the_students_mix(world):
    """Function matching: the student's images and the teacher's input are the same view with the same mix, each
    at its own size, and the teacher's outputs are its outputs on the mixed image; a cached teacher's are mixed as
    class distributions with the mix's weight at the student's size."""
    from rakt.distill.mixing import MixSpec, apply_mix, mix_weight
    from rakt.distill.teacher.checkpoint import load_teacher
    from rakt.distill.teacher_cache import build_cache, teacher_input
    from rakt.distill.train_setup import make_prepare
    from rakt.distill.views import render

    teacher = load_teacher(world["teacher"], device="cpu", classes=CLASSES)
    bank = open_bank([str(world["transfer"])], 32)
    for kind in ("mixup", "cutmix"):
        batch = next(bank_batches(bank, batch_size=8, seed=0, epoch=0, views=ViewSpec("crop"), mix=MixSpec(kind)))
        got = make_prepare(24, teacher, 4.0)({"unlabelled": batch}, torch.device("cpu"), 0)
        mix = batch["mix"]
        assert torch.allclose(got["images"], apply_mix(render(batch["source"], batch["theta"], 24), mix))
        with torch.no_grad():
            want = teacher(apply_mix(teacher_input(teacher, batch["source"], batch["theta"]), mix))
        assert torch.allclose(got["teacher_out"]["logits"], want, atol=1e-5)
        assert (got["labels"] == -1).all()
    cache = build_cache(teacher, bank, str(world["teacher"]), kind="clean", views=1, spec=ViewSpec("crop"), seed=0,
                        features=False, device=torch.device("cpu"))
    batch = next(bank_batches(bank, batch_size=8, seed=0, epoch=0, views=ViewSpec("crop"), cache=cache,
                              mix=MixSpec("cutmix")))
    got = make_prepare(24, teacher, 4.0)({"unlabelled": batch}, torch.device("cpu"), 0)
    p, lam = torch.softmax(batch["teacher_logits"] / 4.0, dim=-1), mix_weight(batch["mix"], 24)
    want = lam * p + (1 - lam) * p[batch["mix"]["perm"]]
    assert 0 < lam < 1 and torch.allclose(torch.softmax(got["teacher_out"]["logits"] / 4.0, dim=-1), want, atol=1e-6)


@pytest.mark.parametrize("cached", [False, True])
def test_distill_with_mixed_batches(world, tmp_path, one_torch_thread, cached):
    """--mix both, online (the teacher on the mixed images) and cached (interpolated targets; features too)."""
    settings = dict(cache_teacher=True, teacher_view="clean", mode="progressive") if cached else {}
    out = tmp_path / "mix"
    summary = run_distill(distill_cfg(world, out, epochs=1, augment="shift", mix="both", mix_alpha=0.4, **settings))
    assert summary["steps"] == 3
    rows = metrics(out)
    assert all(r["kd"] > 0 and r["loss"] == r["loss"] for r in rows)
    assert all(r["feature"] > 0 for r in rows) if cached else "feature" not in rows[0]


def test_corrupt_and_empty_shards_are_counted_skips(world, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "shard-00000.tar").write_bytes(b"this is not a tar file" * 50)
    write_shard(bad / "shard-00001.tar", [])
    good = sorted(str(p) for p in world["transfer"].glob("*.tar"))[:1]
    bank = open_bank(good + [str(bad / "shard-00000.tar"), str(bad / "shard-00001.tar")], 32, keep_decoded=False)
    assert len(bank) == 24 and bank.images.shape == (24, 3, 32, 32)  # 40-px images decoded at the 32-px size
    assert sum(bank.skipped.values()) >= 1
    with pytest.raises(InputError, match=r"no images could be read from .*bad \(skipped: .*truncated_shard"):
        run_distill(distill_cfg(world, tmp_path / "out", transfer=[str(bad)], epochs=1))


def test_batches_are_seeded_by_seed_and_epoch(world):
    """The batches of an epoch are a function of (seed, epoch): the same again, others in another epoch."""
    bank = open_bank([str(world["transfer"])], 32)
    views = ViewSpec("crop", 0.6)

    def epoch(seed, e):
        return list(bank_batches(bank, batch_size=16, seed=seed, epoch=e, views=views))

    a, b, c = epoch(3, 1), epoch(3, 1), epoch(3, 2)
    assert sum(len(x["index"]) for x in a) == 48 and sorted(torch.cat([x["index"] for x in a]).tolist()) == list(range(48))
    assert all(torch.equal(x["index"], y["index"]) and torch.equal(x["theta"], y["theta"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["index"], c[0]["index"])


def test_checkpoint_of_another_architecture_is_refused(distilled, world):
    with pytest.raises(InputError, match="checkpoint of student resnet10t"):
        run_distill(distill_cfg(world, distilled, student="resnet18"))


def test_teacher_class_count_must_match_the_target(world, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\nc\nd\n")
    with pytest.raises(InputError, match="predicts 3 classes but the target task has 4"):
        run_distill(distill_cfg(world, tmp_path / "out", classes=str(classes)))


@pytest.mark.parametrize("mode", ["task", "agnostic", "progressive"])
def test_ddp_two_processes_gloo(world, tmp_path, mode):
    """torchrun with 2 CPU processes (gloo): sharded data, one checkpoint and one metrics log from rank 0; in every
    KD mode (agnostic trains no classifier without labels: DDP must expect parameters without gradients)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "rakt.cli",
           "distill", str(world["transfer"]), "--teacher", str(world["teacher"]), "--student", "resnet10t",
           "--small-input", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--mode", mode,
           "--device", "cpu", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "student.pt", "summary.json"]
    blob = torch.load(out / "checkpoint.pt", weights_only=True)
    assert blob["step"] == 3  # 48 samples, 2 ranks x 1 shard x 24 samples, batches of 8
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert {"task": {"kd"}, "agnostic": {"feature"}, "progressive": {"kd", "feature"}}[mode] <= set(metrics(out)[0])
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_teacher_cache_equals_fresh_teacher_outputs(world, tmp_path, one_torch_thread):
    """Cached outputs = the teacher on the redrawn views; a rerun reuses the cache files; 'clean' = whole images."""
    import shutil

    import numpy as np

    from rakt.distill.teacher.checkpoint import load_teacher
    from rakt.distill.teacher_cache import CACHE_DIR, cache_views, teacher_input

    shards = tmp_path / "shards"
    shutil.copytree(world["transfer"], shards)
    cached = run_distill(distill_cfg(world, tmp_path / "cached", transfer=[str(shards)], epochs=1,
                                     cache_teacher=True, cache_views=2))
    ident = cached["teacher_cache"]
    files = sorted(shards.glob(f"decoded/*/{CACHE_DIR}/{ident}/view-*.npz"))
    assert [f.name for f in files] == ["view-0.npz", "view-1.npz"]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = run_distill(distill_cfg(world, tmp_path / "again", transfer=[str(shards)], epochs=1,
                                    cache_teacher=True, cache_views=2))
    assert again["teacher_cache"] == ident and [f.stat().st_mtime_ns for f in files] == stamps

    teacher = load_teacher(world["teacher"], device="cpu", classes=CLASSES)
    bank = open_bank([str(shards)], 32)
    theta = cache_views("same", ViewSpec("crop", 0.6), 1, 0, len(bank), bank.side)
    with torch.no_grad():
        fresh = teacher(teacher_input(teacher, bank.images, theta))
        whole = teacher(teacher_input(teacher, bank.images, None))
    with np.load(files[1]) as z:
        assert z["logits"].shape == (48, 3) and torch.allclose(torch.from_numpy(z["logits"]), fresh, atol=1e-3)
        assert not torch.allclose(torch.from_numpy(z["logits"]), whole, atol=1e-3)  # a view, not the whole image
    clean = run_distill(distill_cfg(world, tmp_path / "clean", transfer=[str(shards)], epochs=1,
                                    cache_teacher=True, teacher_view="clean"))
    (view,) = shards.glob(f"decoded/*/{CACHE_DIR}/{clean['teacher_cache']}/view-*.npz")
    with np.load(view) as z:
        assert torch.allclose(torch.from_numpy(z["logits"]), whole, atol=1e-3)


def rewrite_in_place(shard: Path, image) -> None:
    """Rewrite `shard` in place with other images, keeping its byte size and mtime (JPEGs padded after their end
    marker to their old length): only the content and the change time differ."""
    import io
    import tarfile

    before = shard.stat()
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, (m, data) in enumerate(members):
            if m.name.endswith(".jpg"):
                new = jpeg_bytes(image(i))
                assert len(new) <= len(data)
                data = new + b"\0" * (len(data) - len(new))
            tar.addfile(m, io.BytesIO(data))
    with open(shard, "r+b") as f:  # same inode
        f.write(buf.getvalue())
        f.truncate()
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert shard.stat().st_size == before.st_size and shard.stat().st_mtime_ns == before.st_mtime_ns


def test_rewritten_shard_never_reuses_teacher_outputs(world, tmp_path, one_torch_thread):
    """A shard rewritten with other images (same size, same mtime) gets a new decoded copy and a new teacher cache;
    the cache is keyed by the decoded content, so two banks of one name but other images never share outputs."""
    import shutil

    import numpy as np

    from rakt.distill.image_bank import ImageBank
    from rakt.distill.teacher_cache import cache_id

    shards = tmp_path / "shards"
    shutil.copytree(world["transfer"], shards)
    run = dict(transfer=[str(shards)], epochs=1, cache_teacher=True, cache_views=1)
    first = run_distill(distill_cfg(world, tmp_path / "first", **run))["teacher_cache"]
    old = open_bank([str(shards)], 32).images.clone()
    rewrite_in_place(shards / "shard-00000.tar", lambda i: np.full((40, 40, 3), (37 * i) % 256, np.uint8))
    second = run_distill(distill_cfg(world, tmp_path / "second", **run))["teacher_cache"]
    new = open_bank([str(shards)], 32)
    assert not torch.equal(old, new.images) and second != first
    assert len(list(shards.glob(f"decoded/*/teacher-cache/{second}/view-0.npz"))) == 1

    labels = torch.zeros(2, dtype=torch.long)
    a = ImageBank(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a", "b"], labels, ident="same-name")
    b = ImageBank(torch.ones(2, 3, 8, 8, dtype=torch.uint8), ["a", "b"], labels, ident="same-name")
    ids = {cache_id(str(world["teacher"]), bank, "same", 1, ViewSpec("crop", 0.6), 0, False) for bank in (a, b)}
    assert len(ids) == 2


class _Plant:
    """A pickled object that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_is_read_with_weights_only(distilled, world, tmp_path, one_torch_thread):
    """checkpoint.pt holds only tensors, numbers and strings (weights_only=True reads it, RNG states included); a
    checkpoint carrying pickled code is refused with a clear error and its code never runs."""
    blob = torch.load(distilled / "checkpoint.pt", weights_only=True)
    assert blob["step"] == 12 and isinstance(blob["rng"]["numpy"][1], torch.Tensor)
    out = tmp_path / "hostile"
    out.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({**blob, "meta": _Plant(marker)}, out / "checkpoint.pt")
    with pytest.raises(InputError, match=r"checkpoint.pt: cannot read the training checkpoint: it holds pickled objects.*--no-resume"):
        run_distill(distill_cfg(world, out, epochs=1))
    assert not marker.exists()


def test_corrupt_image_in_a_transfer_shard_is_counted_in_the_summary(world, tmp_path, one_torch_thread):
    """One undecodable image among good ones: left out, logged, and counted in summary.json's read_errors -- also
    when a later run reuses the decoded copy."""
    from rakt.cli import main

    shard = write_shard(tmp_path / "transfer" / "shard-00000.tar",
                        [{"__key__": f"k{i:03d}", "jpg": jpeg_bytes(image_array(i, 40)), "json": {"i": i}}
                         for i in range(7)] + [{"__key__": "broken", "jpg": b"\xff\xd8\xff\xe0 not a jpeg"}])
    for run in ("first", "again"):
        out = tmp_path / run
        assert main(["distill", str(shard), "--teacher", str(world["teacher"]), "--student", "resnet10t",
                     "--small-input", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                     "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["transfer_samples"] == 7 and summary["read_errors"] == {"undecodable_image": 1}, run
