"""Shared fixtures: a tiny open_clip config, generated images and WebDataset shards, the offline data kit."""
from __future__ import annotations

import functools
import io
import json
import os
import shlex
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rakt.pipeline.encoders import TINY_CLIP

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

KIT = Path(os.environ.get("RAKT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_clip() -> str:
    """Path of rakt's tiny open_clip model config (random init; rakt/pipeline/models/): pass it as the model name."""
    return TINY_CLIP


@pytest.fixture(scope="session")
def kit() -> Path:
    """The offline data kit (../shared/data or $RAKT_DATA)."""
    if not (KIT / "target" / "cifar10").exists():
        pytest.fail(f"offline data kit not found at {KIT}; set RAKT_DATA")
    return KIT


def image_array(seed: int, size: int = 32, base: np.ndarray | None = None, noise: float = 0.0) -> np.ndarray:
    """A random structured RGB image (uint8 HxWx3); with `base`, a noisy copy of it."""
    rng = np.random.default_rng(seed)
    if base is None:
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = np.array(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32)
    else:
        img = base.astype(np.float32)
    if noise:
        img = img + rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height, all black: small on disk, `width*height` pixels decoded (a
    decompression bomb for a large size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    comp, row = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def write_folder(root: Path, per_class: dict[str, list[np.ndarray]]) -> Path:
    """An image folder with one subfolder per class."""
    for cls, arrays in per_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, arr in enumerate(arrays):
            (root / cls / f"{cls}_{i:04d}.jpg").write_bytes(jpeg_bytes(arr))
    return root


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A WebDataset tar (gzip if path ends .gz): each sample is {"__key__": k, "jpg": bytes, "cls": int, "json": dict}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    with tarfile.open(path, mode) as tar:
        for s in samples:
            for ext, value in s.items():
                if ext == "__key__":
                    continue
                if ext == "json":
                    data = json.dumps(value).encode()
                elif ext == "cls":
                    data = str(value).encode()
                else:
                    data = value
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny CPU models: one intra-op thread avoids OpenMP oversubscription on shared cores (10x swings)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_images():
    return image_array


@pytest.fixture
def make_folder():
    return write_folder


@pytest.fixture
def make_shard():
    return write_shard


@pytest.fixture
def to_jpeg():
    return jpeg_bytes


@functools.lru_cache(maxsize=1)
def have_namespaces() -> bool:
    """True where `unshare -r -m` (a user + mount namespace) works: a tiny or read-only mount without root."""
    try:
        return subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_rakt(args: list, *, tmpfs: tuple[Path, int] | None = None, read_only: Path | None = None,
             before: str = "", timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`rakt ARGS` in a fresh process (stdout, stderr as text). With `tmpfs` (DIR, KiB) DIR is a filesystem of that
    size (a full disk), with `read_only` DIR is seen read-only, and `before` runs first in the shell (e.g. copies
    onto the small disk): in a user + mount namespace, so no root is needed; skipped where there is none."""
    cmd = [sys.executable, "-m", "rakt.cli", *map(str, args)]
    steps = []
    if tmpfs is not None:
        steps.append(f"mount -t tmpfs -o size={tmpfs[1]}k tmpfs {shlex.quote(str(tmpfs[0]))}")
    if read_only is not None:
        ro = shlex.quote(str(read_only))
        steps.append(f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}")
    if before:
        steps.append(before)
    if steps:
        if not have_namespaces():
            pytest.skip("needs `unshare -r -m` (user and mount namespaces) for a small or read-only filesystem")
        cmd = ["unshare", "-r", "-m", "sh", "-c", " && ".join(steps) + ' && exec "$@"', "sh", *cmd]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def kill_rakt_when(args: list, ready, timeout: float = 120) -> int:
    """Run `rakt ARGS` in a process of its own, SIGKILL it as soon as `ready()` holds (fail the test if it ends or
    stalls first); returns its exit status."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rakt.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"rakt {' '.join(map(str, args[:2]))} ended or stalled before the moment to kill it: "
                        f"{proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return proc.returncode
