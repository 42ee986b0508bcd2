"""The training data path: image banks decoded once, views drawn and rendered per batch, precision and thread
choices, and progress lines in logs. Real shards and images, no GPU."""
from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import image_array, jpeg_bytes, write_shard
from rakt.distill.image_bank import DECODED_DIR, open_bank
from rakt.distill.batches import ViewSpec, bank_batches, endless_batches
from rakt.distill.views import draw_views, generator, render
from rakt.pipeline import device as dev
from rakt.pipeline.progress import Progress


@pytest.fixture
def shards(tmp_path):
    for s in range(2):
        write_shard(tmp_path / "t" / f"shard-{s:05d}.tar",
                    [{"__key__": f"{s}-{i:03d}", "jpg": jpeg_bytes(image_array(10 * s + i, 32)),
                      **({"cls": i % 3} if s == 0 else {})} for i in range(10)])
    return tmp_path / "t"


def test_bank_decodes_once_and_is_reused_until_a_shard_changes(shards):
    bank = open_bank([str(shards)], 64)
    assert len(bank) == 20 and bank.images.dtype == torch.uint8 and bank.images.shape == (20, 3, 32, 32)
    assert bank.keys[:2] == ["0-000", "0-001"] and bank.labels[:3].tolist() == [0, 1, 2] and bank.labels[-1] == -1
    assert bank.folder is not None and (bank.folder / "bank.json").is_file() and bank.folder.parent.name == DECODED_DIR
    stamp = (bank.folder / "images.npy").stat().st_mtime_ns
    again = open_bank([str(shards)], 64)
    assert again.folder == bank.folder and (bank.folder / "images.npy").stat().st_mtime_ns == stamp
    assert torch.equal(again.images, bank.images) and again.keys == bank.keys
    time.sleep(0.01)
    write_shard(shards / "shard-00001.tar", [{"__key__": "new", "jpg": jpeg_bytes(image_array(99, 32))}])
    changed = open_bank([str(shards)], 64)
    assert changed.folder != bank.folder and len(changed) == 11 and changed.keys[-1] == "new"


def test_bank_side_keeps_small_squares_and_resizes_the_rest(tmp_path):
    write_shard(tmp_path / "a.tar", [{"__key__": "big", "jpg": jpeg_bytes(image_array(1, 80))},
                                     {"__key__": "wide", "jpg": jpeg_bytes(image_array(2, 40)[:, :, :][:20])}])
    bank = open_bank([str(tmp_path / "a.tar")], 48, keep_decoded=False)
    assert bank.images.shape == (2, 3, 48, 48) and bank.folder is None
    write_shard(tmp_path / "b.tar", [{"__key__": "x", "jpg": jpeg_bytes(image_array(3, 32))}])
    assert open_bank([str(tmp_path / "b.tar")], 48, keep_decoded=False).side == 32  # no upsampling on disk


def test_undecodable_images_are_counted_skips(tmp_path):
    write_shard(tmp_path / "s.tar", [{"__key__": "ok", "jpg": jpeg_bytes(image_array(1, 32))},
                                     {"__key__": "bad", "jpg": b"not a jpeg"}])
    bank = open_bank([str(tmp_path / "s.tar")], 32, keep_decoded=False)
    assert bank.keys == ["ok"] and bank.skipped == {"undecodable_image": 1}


def test_views_shift_flip_and_crop():
    gen = generator(0, "test")
    none = draw_views(5, "none", gen)
    assert torch.equal(none, torch.eye(2, 3).expand(5, 2, 3))
    shift = draw_views(200, "shift", generator(1), side=32)
    assert torch.equal(shift[:, 0, 0].abs(), torch.ones(200)) and torch.equal(shift[:, 1, 1], torch.ones(200))
    px = shift[:, :, 2] * 16  # normalized units -> 32-px pixels
    assert torch.allclose(px, px.round(), atol=1e-5) and px.abs().max() == 4 and (shift[:, 0, 0] < 0).any()
    crop = draw_views(500, "crop", generator(2), scale=0.6)
    area = crop[:, 0, 0].abs() * crop[:, 1, 1]
    assert area.min() >= 0.6 * 0.75 - 1e-6 and area.max() <= 1 + 1e-6 and (area < 0.9).any()
    assert torch.equal(draw_views(7, "crop", generator(5)), draw_views(7, "crop", generator(5)))


def test_render_identity_is_a_plain_resize_and_a_flip_mirrors():
    images = torch.from_numpy(image_array(4, 32)).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    x = images.float() / 255
    same = render(images, torch.eye(2, 3).expand(2, 2, 3), 64)
    assert torch.allclose(same, F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False), atol=1e-5)
    assert torch.allclose(render(images, None, 64), same, atol=1e-5)
    flip = torch.eye(2, 3).expand(2, 2, 3).clone()
    flip[:, 0, 0] = -1
    assert torch.allclose(render(images, flip, 32), x.flip(-1), atol=1e-5)


def test_epoch_batches_cover_the_bank_and_labelled_passes_go_on(shards):
    bank = open_bank([str(shards)], 32)
    views = ViewSpec("shift")
    batches = list(bank_batches(bank, batch_size=6, seed=0, epoch=0, views=views))
    assert [len(b["index"]) for b in batches] == [6, 6, 6, 2]
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(20))
    b = batches[0]
    assert b["source"].dtype == torch.uint8 and torch.equal(b["source"], bank.images[b["index"]])
    assert torch.equal(b["labels"], bank.labels[b["index"]])
    endless = endless_batches(bank, batch_size=8, seed=0, epoch=0, views=views)
    seen = [next(endless)["index"] for _ in range(6)]  # two passes of 8, 8, 4 rows, each in its own order
    assert [len(i) for i in seen] == [8, 8, 4, 8, 8, 4]
    first, second = torch.cat(seen[:3]), torch.cat(seen[3:])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(20)) and not torch.equal(first, second)


def test_precision_auto_follows_the_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "cpu_features", lambda: frozenset({"avx2", "avx512f"}))
    assert dev.autocast_dtype(cpu, "auto") is None and not dev.cpu_bf16_native()
    monkeypatch.setattr(dev, "cpu_features", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert dev.autocast_dtype(cpu, "auto") is torch.bfloat16
    monkeypatch.setattr(dev, "cpu_features", lambda: frozenset({"amx_bf16", "amx_tile"}))
    assert dev.autocast_dtype(cpu, "auto") is torch.bfloat16
    assert dev.autocast_dtype(cpu, "fp32") is None and dev.autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert dev.autocast_dtype(cpu, "fp16") is None  # fp16 is for GPUs
    assert "bf16" in dev.device_name(cpu)


def test_this_machines_flags_are_read():
    flags = dev.cpu_features()
    if os.path.exists("/proc/cpuinfo"):
        assert flags, "no CPU flags read from /proc/cpuinfo"
    assert dev.cpu_bf16_native() == bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def test_workers_and_threads_auto_and_explicit(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(dev, "cpu_cores", lambda: 2)
    assert dev.loader_workers(-1, cpu) == 0 and dev.loader_workers(3, cpu) == 3
    assert dev.loader_workers(-1, cuda) == 1
    monkeypatch.setattr(dev, "cpu_cores", lambda: 32)
    assert dev.loader_workers(-1, cpu) == 4 and dev.loader_workers(-1, cuda) == 8
    before = torch.get_num_threads()
    try:
        assert dev.set_threads(1) == 1 and torch.get_num_threads() == 1
        assert 1 <= dev.set_threads(-1) == torch.get_num_threads() <= len(dev.allowed_cpus())
    finally:
        torch.set_num_threads(before)


def test_cgroup_cpu_quota_is_read_from_v2_and_v1_files(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    assert dev.cgroup_cpu_limit(str(v2)) is None  # no cgroup files: no quota
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert dev.cgroup_cpu_limit(str(v2)) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert dev.cgroup_cpu_limit(str(v2)) is None
    v1 = tmp_path / "v1" / "cpu,cpuacct"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert dev.cgroup_cpu_limit(str(v1.parent)) == 2.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert dev.cgroup_cpu_limit(str(v1.parent)) is None
    assert 1 <= dev.cpu_cores() <= len(dev.allowed_cpus())


def test_auto_threads_leave_out_the_cores_other_processes_keep_busy():
    assert dev.threads_for(2, 2, 0.0) == 2 and dev.threads_for(2, 2, 0.3) == 2
    assert dev.threads_for(2, 2, 0.67) == 1  # one busy neighbour, sharing a core with a spinning team
    assert dev.threads_for(2, 2, 3.0) == 1  # never fewer than one
    assert dev.threads_for(8, 8, 2.5) == 5
    assert dev.threads_for(2, 64, 50.0) == 2  # a 2-CPU quota on a busy 64-core host: the host has room


BUSY_LOOP = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(dev.allowed_cpus()) < 2, reason="needs 2 cores")
def test_threads_follow_a_busy_neighbour_and_an_explicit_count_stays():
    """A busy process pinned to one of this process's cores is seen (its own CPU time is not counted), auto threads
    drop below the core count at the next look, and an explicit --threads is never changed."""
    cores, before = len(dev.allowed_cpus()), torch.get_num_threads()
    dev.set_threads(-1)
    neighbour = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(min(dev.allowed_cpus()))])
    try:
        time.sleep(0.5)
        start = dev.cpu_sample()
        spin = time.monotonic() + 1.0
        while time.monotonic() < spin:  # this process busy too: not counted as another's load
            pass
        assert dev.busy_elsewhere(start, dev.cpu_sample()) > 0.7
        threads = dev.adapt_threads(every=0.5)
        assert threads == torch.get_num_threads() <= cores - 1
        assert dev.set_threads(cores) == cores
        time.sleep(0.6)
        assert dev.adapt_threads(every=0.5) == cores == torch.get_num_threads()
    finally:
        neighbour.kill()
        neighbour.wait()
        torch.set_num_threads(before)


MMAPPED_BLOCKS = """
import ctypes, sys
from rakt.pipeline import device
if sys.argv[1] == "tuned":
    assert device.keep_freed_memory()
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
before = mallinfo2().hblks
block = bytearray(48 << 20)  # above the 32 MiB that glibc's adaptive threshold can reach
print(mallinfo2().hblks - before)
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_activation_sized_blocks_stay_in_the_heap():
    """A 48 MiB block is mmapped (and page-faulted on every use) under glibc's defaults, taken from the heap once
    keep_freed_memory has set the thresholds; a user's own MALLOC_* setting is left alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    run = functools.partial(subprocess.run, capture_output=True, text=True, check=True, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    assert run([sys.executable, "-c", MMAPPED_BLOCKS, "default"]).stdout.split() == ["1"]
    assert run([sys.executable, "-c", MMAPPED_BLOCKS, "tuned"]).stdout.split() == ["0"]
    users = run([sys.executable, "-c", "from rakt.pipeline import device; print(device.keep_freed_memory())"],
                env={**env, "MALLOC_TRIM_THRESHOLD_": "1048576"})
    assert users.stdout.split() == ["False"]


def test_progress_writes_log_lines_when_not_on_a_terminal(monkeypatch, caplog):
    monkeypatch.setenv("RAKT_PROGRESS_SECONDS", "0")
    with caplog.at_level(logging.INFO, logger="rakt"):
        with Progress(200, "embed", unit="img") as bar:
            for _ in range(4):
                bar.update(50, loss=0.25)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("embed: 100/200 img (50%), ") and " img/s, " in line and " left" in line
               and "loss 0.25" in line for line in lines), lines
    assert any("done in" in line for line in lines)
