"""`rakt download` against a hostile network and a hostile user (issue 27): a killed download leaves no worker
behind and its rerun fetches again what failed for no fault of the URL; a server cannot stretch a request past
--deadline or --max-size-mb; a run contacts nothing but the manifest's hosts. Real img2dataset downloads from a
loopback server (test_download.serve), real kill -9."""
from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT
from rakt.cli import main
from rakt.pipeline.download import proxy as download_proxy
from rakt.pipeline.download.guard import AddressGuard
from rakt.pipeline.download.report import failure_cause
from test_download import LOOPBACK, no_egress, read_samples, serve, write_manifest  # noqa: F401 (fixture)

WAIT_S = 120  # upper bounds only: nothing here waits for a time to pass


@pytest.fixture
def server():
    with serve("127.0.0.1") as srv:
        yield srv


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_kill_9_of_download_leaves_no_worker_and_the_rerun_gets_every_image(server, tmp_path):
    """4 requests held open by the server, kill -9 of rakt's process: its img2dataset processes die with it,
    write no stats for the shard, and the rerun downloads all 20 images. Before: the worker lived on, failed its
    URLs against the dead proxy, wrote the shard's stats and the rerun trusted them (16 of 20)."""
    urls = [f"{server.base}/hold?{i}" for i in range(4)] + [server.base + p for p in server.good] * 3
    urls = urls[:20]
    manifest = write_manifest(tmp_path / "manifest", urls)
    out = tmp_path / "out"
    flags = [*LOOPBACK, "--processes", "1", "--threads", "4", "--timeout", "60", "--image-size", "48",
             "--shard-size", "20"]
    proc = subprocess.Popen([sys.executable, "-m", "rakt.cli", "download", str(manifest), "--out", str(out),
                             *flags], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert server.held.wait(WAIT_S), "no worker reached the server"
        below = descendants(proc.pid)
        assert below, "img2dataset's processes not found"
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while any(alive(p) for p in below) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = sorted(p for p in below if alive(p))
    finally:
        server.release.set()
        for pid in descendants(proc.pid) | {p for p in below if alive(p)}:
            os.kill(pid, signal.SIGKILL)
    assert left == [], f"processes of the killed download still running: {left}"
    assert not (out / "00000_stats.json").exists()
    assert main(["download", str(manifest), "--out", str(out), *flags]) == 0
    assert len(read_samples(out)) == 20


def test_a_shard_whose_failures_were_not_the_urls_is_fetched_again(server, tmp_path):
    """img2dataset itself, run on the download's input as an orphaned worker would -- its proxy gone (connection
    refused) -- writes shard 0's stats with every URL failed; the next `rakt download` does not trust that
    marker: it fetches the shard again and gets every image."""
    manifest = write_manifest(tmp_path / "manifest", [server.base + p for p in server.good])
    out = tmp_path / "out"
    flags = [*LOOPBACK, "--processes", "1", "--threads", "2", "--timeout", "2", "--image-size", "48",
             "--shard-size", "6"]
    assert main(["download", str(manifest), "--out", str(out), *flags]) == 0
    for name in ("00000_stats.json", "00000.tar", "00000.parquet", "download_report.json"):
        (out / name).unlink()
    orphan = ("import img2dataset, sys; img2dataset.download(url_list=sys.argv[1], input_format='parquet', "
              "url_col='url', output_format='webdataset', output_folder=sys.argv[2], number_sample_per_shard=6, "
              "image_size=48, processes_count=1, thread_count=2, timeout=2, incremental_mode='incremental', "
              "enable_wandb=False, oom_shard_count=5)")
    dead = "http://127.0.0.1:9"  # where the killed download's proxy was: nothing listens
    env = {**os.environ, "http_proxy": dead, "https_proxy": dead, "no_proxy": "", "NO_ALBUMENTATIONS_UPDATE": "1"}
    subprocess.run([sys.executable, "-c", orphan, str(out / "_input" / "urls.parquet"), str(out)], env=env,
                   check=True, capture_output=True, timeout=WAIT_S)
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["successes"] == 0 and all("Connection refused" in m for m in stats["status_dict"])

    server.hits.clear()
    assert main(["download", str(manifest), "--out", str(out), *flags]) == 0
    assert dict(server.hits) == {p: 1 for p in server.good}
    report = json.loads((out / "download_report.json").read_text())
    assert report["samples"] == 6 and report["failed"] == 0 and report["fetched_again"] == ["00000.tar"]


def test_a_server_cannot_hold_a_request_past_the_deadline_or_the_size_cap(server, tmp_path):
    """--deadline 2: a body trickled at 1 byte per 0.5 s (100 s in all with --timeout 1 never firing) and a head
    trickled the same way are cut off within 3 x the deadline; --max-size-mb 1: a declared 5 MiB body is refused
    before it is read, an undeclared one cut off after the cap. Good images around them download."""
    paths = ["/trickle", "/trickle-head", "/big", "/big-undeclared"]
    manifest = write_manifest(tmp_path / "manifest", [server.base + p for p in [*server.good, *paths]])
    out = tmp_path / "out"
    assert main(["download", str(manifest), "--out", str(out), *LOOPBACK, "--processes", "1", "--threads", "8",
                 "--timeout", "1", "--deadline", "2", "--max-size-mb", "1", "--image-size", "48",
                 "--shard-size", "10"]) == 0
    for path in ("/trickle", "/trickle-head"):
        seconds, _ = server.spent[path]
        assert seconds < 3 * 2, (path, seconds)
    assert server.spent["/big"][1] < 5 << 20 and server.spent["/big-undeclared"][1] < 5 << 20
    report = json.loads((out / "download_report.json").read_text())
    assert report["samples"] == len(server.good) and report["failed"] == len(paths)
    assert report["failed_by_cause"]["timeout"] == 1 and report["failed_by_cause"]["too_large"] == 1
    assert report["cut_by_proxy"]["by_cause"] == {"deadline": 1, "too_large": 1}


class Sentinel(http.server.ThreadingHTTPServer):
    """A proxy that forwards nothing: it records what reaches it and answers 403."""
    daemon_threads = True

    def __init__(self):
        self.seen: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self):
                outer.seen.append(f"{self.command} {self.path}")
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_CONNECT = do_POST = do_HEAD = answer

        super().__init__(("127.0.0.1", 0), Handler)


def test_a_download_contacts_only_the_manifests_hosts(server, tmp_path, monkeypatch):
    """Without NO_ALBUMENTATIONS_UPDATE in the environment, neither rakt's process (its own proxy settings point at
    a sentinel) nor img2dataset's (rakt's proxy, which logs what it refuses) asks the package index for
    albumentations' version, or anything else: the sentinel sees nothing, rakt's proxy refuses nothing."""
    sentinel = Sentinel()
    threading.Thread(target=sentinel.serve_forever, daemon=True).start()
    try:
        manifest = write_manifest(tmp_path / "manifest", [server.base + p for p in server.good])
        env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
        url = f"http://127.0.0.1:{sentinel.server_address[1]}"
        env.update(http_proxy=url, https_proxy=url, HTTP_PROXY=url, HTTPS_PROXY=url, no_proxy="", NO_PROXY="")
        proc = subprocess.run([sys.executable, "-m", "rakt.cli", "-v", "download", str(manifest), "--out",
                               str(tmp_path / "out"), *LOOPBACK, "--processes", "1", "--threads", "2",
                               "--image-size", "48"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=WAIT_S * 3)
    finally:
        sentinel.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sentinel.seen == []
    assert "proxy refused" not in proc.stderr and "pypi" not in proc.stderr
    assert json.loads(proc.stdout)["samples"] == len(server.good)


def test_the_proxy_connects_only_to_allowed_hosts_and_relayed_redirect_targets(server, monkeypatch):
    """hosts={127.0.0.1}: a request for another host (127.0.0.2, or the package index) is refused before any name
    lookup (off_manifest_host); the target of a redirect the proxy relayed is allowed from then on."""
    for name in ("no_proxy", "NO_PROXY"):  # no_egress bypasses proxies for 127.0.0.1: here it must go through
        monkeypatch.setenv(name, "")
    lookups = []

    def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        return [host]

    guard = AddressGuard(allow_networks=["127.0.0.0/8"], resolve=resolve)
    with serve("127.0.0.2") as other_server, \
            download_proxy.filtering_proxy(guard, timeout=2, hosts={"127.0.0.1"}) as proxy:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url, "https": proxy.url}))
        other = f"{other_server.base}/img/0.jpg"
        for target in (other, "https://pypi.org/pypi/albumentations/json"):
            with pytest.raises(urllib.error.URLError) as refused:
                opener.open(target, timeout=5)
            assert failure_cause(str(refused.value)) == "off_manifest_host"
        assert lookups == [] and sum(other_server.hits.values()) == 0
        redirect = f"{server.base}/redirect?to={urllib.request.quote(other, safe='')}"
        with opener.open(redirect, timeout=5) as response:
            assert response.read() == other_server.good["/img/0.jpg"]
        assert lookups == ["127.0.0.1", "127.0.0.2"] and other_server.hits["/img/0.jpg"] == 1
