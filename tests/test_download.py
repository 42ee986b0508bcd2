"""`rakt download`: a loopback HTTP server serves real JPEGs and every failure case; the address guard is checked
against the requests that reach the server. Loopback only: refused URLs must never produce traffic."""
from __future__ import annotations

import contextlib
import functools
import http.server
import importlib.util
import sys
import ipaddress
import os
import signal
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from conftest import image_array, jpeg_bytes, png_bomb
from rakt.cli import main
from rakt.pipeline.config import DownloadConfig
from rakt.pipeline.download import proxy as download_proxy
from rakt.pipeline.download.guard import AddressGuard
from rakt.pipeline.download.report import failure_cause

if importlib.util.find_spec("img2dataset") is None:  # the `download` and `test` extras install it
    pytest.skip("img2dataset is not installed", allow_module_level=True)

N_GOOD = 6
SHARD_SIZE = 6
SLOW_S = 3.0  # the slow handler's delay; the client gives up after --timeout 1
LOOPBACK = ["--allow-network", "127.0.0.0/8"]
ONLY_127_0_0_1 = ["--allow-network", "127.0.0.1/32"]
FAST = ["--processes", "1", "--threads", "4", "--timeout", "1", "--image-size", "48",
        "--shard-size", str(SHARD_SIZE)]


@pytest.fixture(scope="module", autouse=True)
def no_egress():
    """Safety net should the guard ever break: urllib (in img2dataset's spawned workers too) sends every request
    for a non-loopback host to a closed loopback port instead of the network, and rakt's proxy (in this process)
    cannot connect to anything but loopback."""
    real_open = download_proxy.open_connection

    def loopback_only(address: str, port: int, timeout: float):
        assert ipaddress.ip_address(address.split("%", 1)[0]).is_loopback, f"test egress to {address}"
        return real_open(address, port, timeout)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(download_proxy, "open_connection", loopback_only)
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            mp.setenv(name, "http://127.0.0.1:9")
        for name in ("no_proxy", "NO_PROXY"):
            mp.setenv(name, "127.0.0.1,localhost")
        yield


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@functools.lru_cache(maxsize=1)
def bodies_of_server() -> tuple[dict[str, bytes], bytes]:
    """(good images by path, a broken JPEG), built once for all servers."""
    return {f"/img/{i}.jpg": jpeg_bytes(image_array(i, size=32 + 8 * i)) for i in range(N_GOOD)}, \
        jpeg_bytes(image_array(99, size=64))


@functools.lru_cache(maxsize=1)
def bomb_png() -> bytes:
    return png_bomb(30000, 30000)


@contextlib.contextmanager
def serve(host: str):
    """A threaded HTTP server on `host` (port 0) with one path per case; counts the requests per path."""
    good, broken = bodies_of_server()
    bodies = {**good, "/page.html": b"<html><body>not an image</body></html>",
              "/truncated.jpg": broken[: len(broken) // 2], "/bomb.png": bomb_png()}
    hits: Counter = Counter()
    lock, stop = threading.Lock(), threading.Event()
    held, release = threading.Event(), threading.Event()  # /hold answers once released
    spent: dict[str, tuple[float, int]] = {}  # slow paths: (seconds until done or cut off, body bytes written)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test log quiet
            pass

        def send(self, code: int, body: bytes, length: int | None = None, **headers) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            with lock:
                hits[self.path] += 1
            if self.path in bodies:
                kind = "text/html" if self.path.endswith(".html") else "image/jpeg"
                self.send(200, bodies[self.path], Content_Type=kind)
            elif self.path == "/error":
                self.send(500, b"boom")
            elif self.path == "/loop":
                self.send(302, b"", Location="/loop")
            elif self.path.startswith("/redirect?to="):
                self.send(302, b"", Location=unquote(self.path.split("=", 1)[1]))
            elif self.path == "/slow":
                stop.wait(SLOW_S)  # bounded; the client has given up long before
                try:
                    self.send(200, good["/img/0.jpg"])
                except OSError:
                    pass
            elif self.path.startswith("/hold"):  # a request that stays open until the test releases it
                held.set()
                release.wait(120)
                self.send(200, good["/img/1.jpg"], Content_Type="image/jpeg")
            elif self.path in ("/trickle", "/trickle-head", "/big", "/big-undeclared"):
                self.slow()
            elif self.path == "/cut.jpg":  # the connection drops halfway through the body
                self.send(200, broken[: len(broken) // 2], length=len(broken))
                self.close_connection = True
            else:
                self.send(404, b"not found")

        def slow(self) -> None:
            """/trickle: a 100-byte body, 1 byte per 0.5 s; /trickle-head: the headers so; /big: a declared 5 MiB
            body; /big-undeclared: 5 MiB until the connection closes. Records how long and how much."""
            start, sent, path = time.monotonic(), 0, self.path
            big = path.startswith("/big")
            try:
                if path == "/trickle-head":  # the head itself never ends
                    self.wfile.write(b"HTTP/1.0 200 OK\r\n")
                    for _ in range(100):
                        if stop.wait(0.5):
                            break
                        self.wfile.write(b"X-Slow: 1\r\n")
                        self.wfile.flush()
                    return
                self.send_response(200)
                if path != "/big-undeclared":
                    self.send_header("Content-Length", str(5 << 20 if big else 100))
                self.end_headers()
                for _ in range(80 if big else 100):
                    if not big and stop.wait(0.5):
                        break
                    chunk = b"\0" * (64 << 10) if big else b"x"
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    sent += len(chunk)
            except OSError:
                pass
            finally:
                self.close_connection = True
                spent[path] = (time.monotonic() - start, sent)

    srv = Server((host, 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.hits, srv.lock, srv.good = hits, lock, good
    srv.held, srv.release, srv.spent = held, release, spent
    srv.port = srv.server_address[1]
    srv.base = f"http://{host}:{srv.port}"
    try:
        yield srv
    finally:
        stop.set()
        release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
    with serve("127.0.0.1") as srv:
        yield srv


@pytest.fixture(scope="module")
def other_server():
    """A second server on 127.0.0.2: loopback, but outside `--allow-network 127.0.0.1/32`."""
    with serve("127.0.0.2") as srv:
        yield srv


def write_manifest(path: Path, urls: list[str | None], with_url: bool = True) -> Path:
    """A transfer manifest (contract of `rakt curate`) with one row per URL, pool_id = position."""
    n = len(urls)
    cols = {
        "pool_id": pa.array(range(n), pa.int64()),
        "id": pa.array([f"pool_{i:04d}" for i in range(n)]),
        "url": pa.array(urls, pa.string()),
        "caption": pa.array([f"caption {i}" for i in range(n)]),
        "score": pa.array(np.linspace(0.9, 0.5, n, dtype=np.float32)),
        "query_id": pa.array([f"q{i % 3}" for i in range(n)]),
        "query_label": pa.array([i % 3 if i % 4 else None for i in range(n)], pa.int64()),
        "rank": pa.array([i // 3 for i in range(n)], pa.int32()),
        "query_ids": pa.array([[f"q{i % 3}", "q9"] for i in range(n)], pa.list_(pa.string())),
    }
    if not with_url:
        cols.pop("url")
        cols["path"] = pa.array([f"/pool/{i}.jpg" for i in range(n)])
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path / "manifest.parquet")
    (path / "manifest.json").write_text(json.dumps({"counts": {"selected": n}}))
    return path


FAILURES = {"/missing.jpg": "http_404", "/error": "http_5xx", "/slow": "timeout", "/loop": "redirect_loop",
            "/page.html": "undecodable", "/truncated.jpg": "undecodable", "/cut.jpg": "truncated",
            "/bomb.png": "image_too_large"}
REFUSED = {"http://169.254.169.254/latest/meta-data/": "blocked_address", "http://10.1.2.3/x.jpg": "blocked_address",
           "http://[::ffff:169.254.169.254]/latest": "blocked_address", "file:///etc/passwd": "bad_scheme"}


@pytest.fixture(scope="module")
def downloaded(server, tmp_path_factory):
    """One download of 6 good images, every failure case and refused URLs (loopback allowed): (out, manifest)."""
    root = tmp_path_factory.mktemp("download")
    urls = [server.base + p for p in server.good] + [server.base + p for p in FAILURES] + list(REFUSED)
    urls += [f"ftp://127.0.0.1:{server.server_address[1]}/img/0.jpg", None]
    manifest = write_manifest(root / "manifest", urls)
    server.hits.clear()
    assert main(["download", str(manifest), "--out", str(root / "out"), *LOOPBACK, *FAST]) == 0
    return root / "out", manifest, Counter(server.hits)


def read_samples(out: Path) -> list[dict]:
    shards = sorted(str(p) for p in out.glob("*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False).decode("rgb8"))


def test_good_images_become_samples_traceable_to_pool_and_queries(downloaded, server):
    out, _, _ = downloaded
    samples = read_samples(out)
    assert len(samples) == N_GOOD
    by_pool = {s["json"]["pool_id"]: s for s in samples}
    assert sorted(by_pool) == list(range(N_GOOD))
    for pool_id, s in by_pool.items():
        meta = s["json"]
        assert meta["id"] == f"pool_{pool_id:04d}"
        assert meta["url"] == server.base + f"/img/{pool_id}.jpg"
        assert meta["query_id"] == f"q{pool_id % 3}"
        assert meta["query_ids"] == [f"q{pool_id % 3}", "q9"]
        assert meta["caption"] == s["txt"] == f"caption {pool_id}"
        assert meta["query_label"] == (pool_id % 3 if pool_id % 4 else None)
        assert type(meta["pool_id"]) is int and type(meta["query_label"]) in (int, type(None))
        assert meta["rank"] == pool_id // 3 and meta["score"] == pytest.approx(0.9 - 0.4 * pool_id / 19, abs=1e-6)
        assert s["jpg"].shape[:2] == (48, 48)  # decoded by webdataset at the requested size (border mode)


def test_each_failure_is_counted_under_its_cause(downloaded):
    out, _, _ = downloaded
    report = json.loads((out / "download_report.json").read_text())
    assert report["failed_by_cause"] == dict(sorted(Counter(FAILURES.values()).items()))
    assert report["failed"] == len(FAILURES)
    assert report["samples"] == N_GOOD and report["incomplete_shards"] == []
    n_rows = N_GOOD + len(FAILURES) + len(REFUSED) + 2
    assert report["rows"] == n_rows == sum(s["count"] for s in report["shards"])
    assert [s["shard"] for s in report["shards"]] == [f"{j:05d}.tar" for j in range(-(-n_rows // SHARD_SIZE))]
    assert sum(report["messages"].values()) == len(FAILURES)


def test_refused_urls_are_counted_and_never_fetched(downloaded, server):
    out, _, hits = downloaded
    report = json.loads((out / "download_report.json").read_text())
    assert report["refused_by_cause"] == {"bad_scheme": 2, "blocked_address": 3, "no_url": 1}
    assert report["refused"] == 6
    listed = {r["url"]: r["cause"] for r in report["refused_rows"]}
    assert {u: listed[u] for u in REFUSED} == REFUSED
    assert set(hits) == set(server.good) | set(FAILURES)  # only allowed URLs reached the server
    assert hits["/img/0.jpg"] == 1  # the ftp:// URL to the same path was not fetched either


def test_loopback_refused_unless_allowed(server, tmp_path):
    port = server.server_address[1]
    urls = [server.base + "/img/1.jpg", f"http://localhost:{port}/img/2.jpg", f"http://[::1]:{port}/img/3.jpg",
            f"http://0.0.0.0:{port}/img/4.jpg", f"http://2130706433:{port}/img/5.jpg",
            *(f"http://[{a}]:{port}/img/0.jpg" for a in ("2002:7f00:1::", "::ffff:127.0.0.1", "fec0::1"))]
    manifest = write_manifest(tmp_path / "manifest", urls)
    server.hits.clear()
    assert main(["download", str(manifest), "--out", str(tmp_path / "out"), *FAST]) == 0
    assert sum(server.hits.values()) == 0
    report = json.loads((tmp_path / "out" / "download_report.json").read_text())
    assert report["refused_by_cause"] == {"blocked_address": len(urls)}
    assert report["samples"] == 0 and report["failed"] == 0


def test_redirects_are_checked_by_the_proxy(server, other_server, tmp_path):
    """Only 127.0.0.1 is allowed: redirects to 127.0.0.2 (http, and https via CONNECT) and to ftp:// are refused
    by the proxy without a connection; a redirect to an allowed address still downloads."""
    to = {"http": f"{other_server.base}/img/0.jpg", "https": f"https://127.0.0.2:{other_server.port}/img/1.jpg",
          "ftp": f"ftp://127.0.0.1:{server.port}/img/3.jpg", "ok": "/img/2.jpg"}
    urls = [f"{server.base}/redirect?to={quote(u, safe='')}" for u in to.values()]
    urls.append(f"{other_server.base}/img/4.jpg")  # direct: refused by the guard before the download
    manifest = write_manifest(tmp_path / "manifest", urls)
    server.hits.clear()
    other_server.hits.clear()
    assert main(["download", str(manifest), "--out", str(tmp_path / "out"), *ONLY_127_0_0_1, *FAST]) == 0
    assert sum(other_server.hits.values()) == 0
    assert set(server.hits) == {f"/redirect?to={quote(u, safe='')}" for u in to.values()} | {"/img/2.jpg"}
    report = json.loads((tmp_path / "out" / "download_report.json").read_text())
    assert report["samples"] == 1 and [s["json"]["pool_id"] for s in read_samples(tmp_path / "out")] == [3]
    assert report["failed_by_cause"] == {"bad_scheme": 1, "blocked_address": 2}
    assert report["refused_by_cause"] == {"blocked_address": 1}
    blocked = report["failed_examples"]["blocked_address"]
    assert any(m.startswith("HTTP Error 403: rakt proxy refused: blocked_address (127.0.0.2") for m in blocked)
    assert any("Tunnel connection failed: 403 rakt proxy refused: blocked_address" in m for m in blocked)


def test_proxy_resolves_every_request_and_connects_to_the_checked_address(server, other_server):
    """DNS rebinding: the proxy resolves each request afresh and connects to the address it judged (the fake
    names do not resolve on this machine, so a second lookup would fail)."""
    answers = {"pinned.test": [["127.0.0.1"], ["127.0.0.1"]], "flip.test": [["127.0.0.1"], ["127.0.0.2"]],
               "mixed.test": [["127.0.0.1", "127.0.0.2"]], "private.test": [["127.0.0.2"]]}
    calls = Counter()

    def resolve(host: str, port: int) -> list[str]:
        calls[host] += 1
        if host not in answers:
            raise OSError(f"no such host {host}")
        return answers[host][min(calls[host], len(answers[host])) - 1]

    guard = AddressGuard(allow_networks=["127.0.0.1/32"], resolve=resolve)
    server.hits.clear()
    other_server.hits.clear()
    with download_proxy.filtering_proxy(guard, timeout=2) as proxy:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url, "https": proxy.url}))

        def fetch(target: str) -> bytes | str:
            try:
                with opener.open(target, timeout=5) as r:
                    return r.read()
            except (urllib.error.HTTPError, urllib.error.URLError) as e:
                return str(e)

        image = server.good["/img/0.jpg"]
        assert fetch(f"http://pinned.test:{server.port}/img/0.jpg") == image
        assert fetch(f"http://flip.test:{server.port}/img/0.jpg") == image
        results = {host: fetch(f"http://{host}:{other_server.port}/img/0.jpg")
                   for host in ("flip.test", "mixed.test", "private.test", "nowhere.test")}
        results["https"] = fetch(f"https://private.test:{other_server.port}/img/0.jpg")
        assert fetch(f"http://pinned.test:{server.port}/img/0.jpg") == image
    assert sum(other_server.hits.values()) == 0 and server.hits["/img/0.jpg"] == 3
    assert {k: failure_cause(v) for k, v in results.items()} == {
        "flip.test": "blocked_address", "mixed.test": "blocked_address", "private.test": "blocked_address",
        "nowhere.test": "unresolvable_host", "https": "blocked_address"}
    assert "127.0.0.2" in results["flip.test"] and "Tunnel connection failed" in results["https"]
    assert calls["pinned.test"] == 2 and calls["flip.test"] == 2  # no cache: every request is resolved again


# IPv6 forms that carry a private IPv4 or lie outside global unicast; `ipaddress.is_global` judged several of them
# public on some Python patch versions
NOT_PUBLIC = ["2002:7f00:1::", "2002:a9fe:a9fe::1", "2002:c0a8:101::1", "fec0::1", "fec0:1:2::3", "::ffff:127.0.0.1",
              "::ffff:169.254.169.254", "::127.0.0.1", "::1", "::", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",
              "64:ff9b:1::a00:1", "2001:0:4136:e378:8000:63bf:80ff:fffe", "2001:0:7f00:1:8000:63bf:f7f7:f7f7",
              "fc00::1", "fd12:3456::1", "fe80::1", "ff02::1", "ff0e::1", "100::1", "2001:db8::1", "2001:2::1",
              "2001:10::1", "3fff::1", "127.0.0.1", "10.1.2.3", "100.64.0.1", "169.254.169.254", "172.16.0.1",
              "192.0.0.8", "192.168.1.1", "198.18.0.1", "192.0.2.1", "224.0.0.1", "240.0.0.1", "255.255.255.255"]
PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946", "2a00:1450:4001:82b::200e",
          "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1", "2001:0:4136:e378:8000:63bf:f7f7:f7f7"]


@pytest.mark.parametrize("stdlib_says", [True, False], ids=["is_global_true", "is_global_false"])
@pytest.mark.parametrize("address", NOT_PUBLIC + PUBLIC)
def test_guard_judges_the_address_itself(address, stdlib_says, monkeypatch):
    """6to4 / Teredo / NAT64 / IPv4-mapped and -compatible addresses are judged by the IPv4 they carry, site-local
    and the other non-global ranges are refused -- whatever this Python's `ipaddress.is_global` answers."""
    for cls in (ipaddress.IPv4Address, ipaddress.IPv6Address):
        for prop in ("is_global", "is_private"):
            monkeypatch.setattr(cls, prop, property(lambda self, v=stdlib_says if prop == "is_global" else
                                                    not stdlib_says: v))
    guard = AddressGuard(resolve=lambda host, port: [address])
    expected = None if address in PUBLIC else "blocked_address"
    assert guard.check_all(["http://h.example/x.jpg"]) == [expected]
    assert guard.judge("h.example", 80)[0] == expected  # what the filtering proxy asks


def test_proxy_refuses_ipv6_forms_that_carry_private_ipv4(monkeypatch):
    """The filtering proxy judges by the same rule: a host resolving to a 6to4, NAT64, Teredo, mapped or
    site-local address is refused with 403 and never connected to."""
    forms = {"sixtofour.test": "2002:7f00:1::", "metadata.test": "2002:a9fe:a9fe::1", "sitelocal.test": "fec0::1",
             "mapped.test": "::ffff:127.0.0.1", "nat64.test": "64:ff9b::a9fe:a9fe",
             "teredo.test": "2001:0:4136:e378:8000:63bf:80ff:fffe"}
    connects = []
    monkeypatch.setattr(download_proxy, "open_connection", lambda *a: connects.append(a) or 1 / 0)
    guard = AddressGuard(resolve=lambda host, port: [forms[host]])
    with download_proxy.filtering_proxy(guard, timeout=2) as proxy:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url, "https": proxy.url}))
        for host, address in forms.items():
            for scheme in ("http", "https"):
                with pytest.raises(urllib.error.URLError) as refused:
                    opener.open(f"{scheme}://{host}/x.jpg", timeout=5)
                assert failure_cause(str(refused.value)) == "blocked_address" and address in str(refused.value)
    assert connects == []


def test_proxy_environment_points_every_scheme_at_the_proxy(monkeypatch):
    monkeypatch.setenv("https_proxy", "http://corp:3128")
    env = download_proxy.proxy_environment("http://127.0.0.1:5555")
    for name in ("http_proxy", "https_proxy", "ftp_proxy", "HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY"):
        assert env[name] == "http://127.0.0.1:5555"
    assert env["no_proxy"] == env["NO_PROXY"] == ""
    monkeypatch.setattr(os, "environ", {**os.environ, **env})
    proxies = urllib.request.getproxies()
    assert {k: proxies.get(k) for k in ("http", "https", "ftp")} == dict.fromkeys(
        ("http", "https", "ftp"), "http://127.0.0.1:5555")
    assert not urllib.request.proxy_bypass("127.0.0.1") and not urllib.request.proxy_bypass("localhost")


def test_rerun_fetches_only_the_missing_shard(downloaded, server, tmp_path):
    out, manifest, _ = downloaded
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for name in ("00000.tar", "00000.parquet", "00000_stats.json"):
        (copy / name).unlink()
    server.hits.clear()
    assert main(["download", str(manifest), "--out", str(copy), *LOOPBACK, *FAST]) == 0
    assert dict(server.hits) == {p: 1 for p in server.good}  # shard 0 holds exactly the good images
    assert len(read_samples(copy)) == N_GOOD
    report = json.loads((copy / "download_report.json").read_text())
    assert report["failed_by_cause"] == json.loads((out / "download_report.json").read_text())["failed_by_cause"]

    server.hits.clear()  # everything done: nothing is fetched, the report is rebuilt
    assert main(["download", str(manifest), "--out", str(copy), *LOOPBACK, *FAST]) == 0
    assert sum(server.hits.values()) == 0
    assert json.loads((copy / "download_report.json").read_text())["samples"] == N_GOOD


def test_rerun_with_another_manifest_is_refused(downloaded, tmp_path, capsys):
    out, _, _ = downloaded
    other = write_manifest(tmp_path / "other", ["http://10.0.0.1/a.jpg"])
    assert main(["download", str(other), "--out", str(out), *FAST]) == 2
    assert "another manifest" in capsys.readouterr().err


def test_manifest_without_urls_points_to_materialize(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "manifest", [None, None], with_url=False)
    assert main(["download", str(manifest), "--out", str(tmp_path / "out")]) == 2
    assert "rakt materialize" in capsys.readouterr().err
    nulls = write_manifest(tmp_path / "nulls", [None, None])
    assert main(["download", str(nulls), "--out", str(tmp_path / "out")]) == 2
    assert "rakt materialize" in capsys.readouterr().err


def test_guard_causes_without_network():
    fake_dns = {"public.example": ["93.184.216.34"], "rebind.example": ["93.184.216.34", "192.168.1.5"],
                "v6.example": ["2606:2800:220:1:248:1893:25c8:1946"], "ll6.example": ["fe80::1%eth0"]}

    def resolve(host: str, port: int) -> list[str]:
        if host in fake_dns:
            return fake_dns[host]
        with contextlib.suppress(ValueError):  # an address literal resolves to itself, as with getaddrinfo
            return [str(ipaddress.ip_address(host))]
        raise OSError(f"no such host {host}")  # what socket.gaierror is

    guard = AddressGuard(resolve=resolve)
    urls = ["http://public.example/a.jpg", "https://v6.example/b.png", "http://rebind.example/c.jpg",
            "http://ll6.example/d.jpg", "http://nowhere.example/e.jpg", "gopher://public.example/",
            "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/x", "http://224.0.0.1/x",
            "http://100.64.0.1/x", "http://[::ffff:10.0.0.1]/x", "http:///nohost", "http://h:99999/x", None,
            "http://127.0.0.1@public.example/x", "http://public.example\\@127.0.0.1/x", "http://public.example/a b",
            " http://public.example/ok.jpg\n"]
    assert guard.check_all(urls) == [None, None, "blocked_address", "blocked_address", "unresolvable_host",
                                     "bad_scheme", "blocked_address", "blocked_address", "blocked_address",
                                     "blocked_address", "blocked_address", "bad_url", "bad_url", "no_url",
                                     "bad_url", "bad_url", "bad_url", None]
    allowed = AddressGuard(allow_networks=["192.168.0.0/16", "10.0.0.0/8"], resolve=resolve)
    assert allowed.check_all(["http://rebind.example/c.jpg", "http://[::ffff:10.0.0.1]/x", "http://10.9.9.9/",
                              "http://169.254.169.254/"]) == [None, None, None, "blocked_address"]
    anything = AddressGuard(allow_private=True, resolve=resolve)
    assert anything.check_all(["http://169.254.169.254/", "ftp://public.example/"]) == [None, "bad_scheme"]


def test_resolves_each_host_once():
    calls = Counter()

    def resolve(host: str, port: int) -> list[str]:
        calls[(host, port)] += 1
        return ["93.184.216.34"]

    guard = AddressGuard(resolve=resolve)
    guard.check_all([f"http://a.example/{i}.jpg" for i in range(50)] + ["https://a.example/x", "http://b.example/"])
    guard.check_all(["http://a.example/again.jpg"])
    assert calls == {("a.example", 80): 1, ("a.example", 443): 1, ("b.example", 80): 1}


@pytest.mark.parametrize("message,cause", [
    ("HTTP Error 404: Not Found", "http_404"),
    ("HTTP Error 403: Forbidden", "http_4xx"),
    ("HTTP Error 503: Service Unavailable", "http_5xx"),
    ("HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite loop.\n"
     "The last 30x error message was:\nFound", "redirect_loop"),
    ("timed out", "timeout"),
    ("<urlopen error timed out>", "timeout"),
    ("IncompleteRead(759 bytes read, 759 more expected)", "truncated"),
    ("Image decoding error", "undecodable"),
    ("OpenCV(4.14.0) loadsave.cpp:79: error: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS in function "
     "'validateInputImageSize'\n", "image_too_large"),
    ("image area too large", "image_too_large"),
    ("<urlopen error [Errno 111] Connection refused>", "proxy_unreachable"),  # every request goes via the proxy
    ("<urlopen error [Errno 24] Too many open files>", "local_error"),
    ("HTTP Error 504: rakt proxy: deadline of 3 s passed before the response", "timeout"),
    ("HTTP Error 502: rakt proxy: response too large (9,000,000 bytes declared, the cap is 1,048,576)", "too_large"),
    ("HTTP Error 403: rakt proxy refused: off_manifest_host (pypi.org)", "off_manifest_host"),
    ("HTTP Error 403: rakt proxy refused: blocked_address (internal.example 10.0.0.5)", "blocked_address"),
    ("<urlopen error Tunnel connection failed: 403 rakt proxy refused: blocked_address (x 10.0.0.5)>",
     "blocked_address"),
    ("HTTP Error 403: rakt proxy refused: bad_scheme (ftp://10.0.0.5/x)", "bad_scheme"),
    ("HTTP Error 502: rakt proxy: cannot connect to a.example:80: [Errno 111] Connection refused",
     "connection_error"),
    ("HTTP Error 504: rakt proxy: cannot connect to a.example:80: timed out", "timeout"),
    ("something new", "other"),
])
def test_failure_cause(message, cause):
    assert failure_cause(message) == cause


def test_config_errors(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "manifest", ["http://10.0.0.1/a.jpg"])
    for flags, text in ((["--allow-network", "10.0.0/33"], "CIDR"),
                        (["--encode-format", "png"], "compression level"),
                        (["--shard-size", "0"], "shard_size")):
        assert main(["download", str(manifest), "--out", str(tmp_path / "out"), *flags]) == 2
        assert text in capsys.readouterr().err
    assert DownloadConfig().max_image_area == 89_478_485 == Image.MAX_IMAGE_PIXELS


def test_ray_engine_without_ray_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where Ray is not installed
    manifest = write_manifest(tmp_path / "manifest", ["http://10.0.0.1/a.jpg"])
    assert main(["download", str(manifest), "--out", str(tmp_path / "out"), "--engine", "ray"]) == 2
    assert "pip install 'rakt[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_stray_json_in_out_is_refused_before_img2dataset_sees_it(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "manifest", ["http://10.0.0.1/a.jpg"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.json").write_text("{}")  # img2dataset would crash on int("notes.json")
    assert main(["download", str(manifest), "--out", str(tmp_path / "out"), *FAST]) == 2
    assert "notes.json" in capsys.readouterr().err


def test_ray_engine_downloads_what_the_local_engine_downloads(downloaded, server, tmp_path):
    """img2dataset's ray distributor on a local Ray (started by rakt, so its workers use rakt's proxy)."""
    import ray

    urls = [server.base + p for p in server.good] + [server.base + "/404"]
    manifest = write_manifest(tmp_path / "manifest", urls)
    try:
        assert main(["download", str(manifest), "--out", str(tmp_path / "ray"), *LOOPBACK, *FAST,
                     "--engine", "ray"]) == 0
    finally:
        ray.shutdown()
    local = {s["json"]["pool_id"]: s["jpg"].tobytes() for s in read_samples(downloaded[0])}
    on_ray = {s["json"]["pool_id"]: s["jpg"].tobytes() for s in read_samples(tmp_path / "ray")}
    assert sorted(on_ray) == list(range(len(server.good)))
    assert all(on_ray[i] == local[i] for i in on_ray)
    report = json.loads((tmp_path / "ray" / "download_report.json").read_text())
    assert report["failed_by_cause"] == {"http_404": 1}
