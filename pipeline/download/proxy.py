"""Filtering forward proxy for `rakt download`: closes the redirect / DNS re-resolution gap of the address guard.

img2dataset's urllib workers follow redirects and resolve hosts themselves. Run with this proxy (in the driver,
bound to 127.0.0.1) as their `http_proxy`/`https_proxy`/`ftp_proxy`, every request they make -- each redirect
hop is a new one -- reaches the proxy, which resolves the host itself, judges every address with the guard's
policy (`AddressGuard.judge`) and connects to an address it checked, never resolving again. Plain HTTP is
forwarded (absolute-URI requests), HTTPS tunnelled (CONNECT, checked at CONNECT time). A refused request gets
`403 rakt proxy refused: CAUSE (DETAIL)`, which urllib reports as `HTTP Error 403: rakt proxy refused: ...`
(plain HTTP) or `Tunnel connection failed: 403 rakt proxy refused: ...` (HTTPS); no connection is made.

One thread per connection; every socket has a timeout. Limit: only workers that inherit the driver's
environment and can reach its loopback use the proxy (not Ray workers on other nodes).
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import socketserver
import threading
from typing import Iterator
from urllib.parse import urlsplit

from pipeline.download.guard import BAD_SCHEME, BAD_URL, AddressGuard

log = logging.getLogger("rakt.download")

REFUSED_REASON = "rakt proxy refused"  # the reason phrase of the proxy's 403 answers
FAILED_REASON = "rakt proxy"  # ... and of its 502/504 answers (cannot connect)
MAX_HEAD = 64 * 1024  # bytes of request line + headers
CHUNK = 64 * 1024
HOP_HEADERS = {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "te", "trailer", "upgrade"}
PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy")  # ftp: urllib follows http -> ftp:// redirects
NO_PROXY_VARS = ("no_proxy", "NO_PROXY")


class Refused(Exception):
    """A request the proxy answers itself: HTTP status and reason phrase."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def open_connection(address: str, port: int, timeout: float) -> socket.socket:
    """Connect to one IP address literal (AI_NUMERICHOST: no name lookup can happen here)."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_NUMERICHOST)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def split_host_port(authority: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' of a CONNECT request -> (host, port); ValueError when malformed."""
    parts = urlsplit(f"//{authority}")
    if not parts.hostname or parts.port is None or parts.username is not None or parts.path:
        raise ValueError(authority)
    return parts.hostname, parts.port


class Handler(socketserver.BaseRequestHandler):
    """One client connection: read the request head, check the target, connect, relay."""

    server: "ProxyServer"

    def handle(self) -> None:
        client, upstream = self.request, None
        client.settimeout(self.server.idle_timeout)
        try:
            head, extra = self.read_head(client)
            method, target, version, headers = self.parse(head)
            if method == "CONNECT":
                upstream = self.connect(*self.connect_target(target))
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                (host, port), path = self.forward_target(target)
                upstream = self.connect(host, port)
                upstream.sendall(self.forward_head(method, path, version, headers))
            if extra:
                upstream.sendall(extra)
            self.relay(client, upstream)
        except Refused as e:
            self.answer(client, e.status, e.reason)
        except (OSError, ValueError, UnicodeError) as e:
            log.debug("proxy: connection dropped: %s", e)
        finally:
            if upstream is not None:
                upstream.close()

    @staticmethod
    def read_head(client: socket.socket) -> tuple[bytes, bytes]:
        buf = b""
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD:
                raise Refused(431, f"{FAILED_REASON}: request head too large")
            data = client.recv(CHUNK)
            if not data:
                raise ValueError("client closed before the end of the request head")
            buf += data
        head, extra = buf.split(b"\r\n\r\n", 1)
        return head, extra

    @staticmethod
    def parse(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise Refused(400, f"{REFUSED_REASON}: {BAD_URL} (malformed request line)") from None
        headers = [tuple(s.strip() for s in line.split(":", 1)) for line in lines[1:] if ":" in line]
        return method.upper(), target, version, headers  # type: ignore[return-value]

    def connect_target(self, target: str) -> tuple[str, int]:
        try:
            return split_host_port(target)
        except ValueError:
            raise Refused(403, f"{REFUSED_REASON}: {BAD_URL} (CONNECT {target[:200]})") from None

    def forward_target(self, target: str) -> tuple[tuple[str, int], str]:
        """(host, port) and origin-form path of an absolute-URI request; the guard's URL checks apply."""
        if not target.lower().startswith("http://"):  # ftp:// from a redirect, https:// without CONNECT
            raise Refused(403, f"{REFUSED_REASON}: {BAD_SCHEME} ({target[:200]})")
        cause, host = self.server.guard.split(target)
        if cause is not None or host is None:
            raise Refused(403, f"{REFUSED_REASON}: {cause} ({target[:200]})")
        parts = urlsplit(target)
        return host, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    @staticmethod
    def forward_head(method: str, path: str, version: str, headers: list[tuple[str, str]]) -> bytes:
        kept = [f"{k}: {v}" for k, v in headers if k.lower() not in HOP_HEADERS]
        return "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""]).encode("latin-1")

    def connect(self, host: str, port: int) -> socket.socket:
        """Resolve now, refuse a disallowed address, connect to a checked one."""
        cause, addresses = self.server.guard.judge(host, port)
        if cause is not None:
            log.debug("proxy refused %s:%d (%s %s)", host, port, cause, " ".join(addresses))
            raise Refused(403, f"{REFUSED_REASON}: {cause} ({host} {' '.join(addresses)})".strip())
        error: OSError | None = None
        for address in addresses:
            try:
                return open_connection(address, port, self.server.connect_timeout)
            except OSError as e:
                error = e
        if isinstance(error, TimeoutError):
            raise Refused(504, f"{FAILED_REASON}: cannot connect to {host}:{port}: timed out")
        raise Refused(502, f"{FAILED_REASON}: cannot connect to {host}:{port}: {error}")

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy bytes both ways until either side closes or nothing moves for `idle_timeout` seconds."""
        upstream.settimeout(self.server.idle_timeout)
        peers = {client.fileno(): (client, upstream), upstream.fileno(): (upstream, client)}
        poller = select.poll()  # not select(): no limit on descriptor numbers with many connections
        for fd in peers:
            poller.register(fd, select.POLLIN)
        while True:
            events = poller.poll(self.server.idle_timeout * 1000)
            if not events:
                return
            for fd, _ in events:
                source, sink = peers[fd]
                data = source.recv(CHUNK)
                if not data:
                    return
                sink.sendall(data)

    @staticmethod
    def answer(client: socket.socket, status: int, reason: str) -> None:
        reason = reason.replace("\r", " ").replace("\n", " ")
        body = (reason + "\n").encode("utf-8", "replace")
        head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n" \
               "Connection: close\r\n\r\n"
        with contextlib.suppress(OSError):
            client.sendall(head.encode("utf-8", "replace") + body)


class ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # many worker threads connect at once

    def __init__(self, guard: AddressGuard, connect_timeout: float, idle_timeout: float):
        super().__init__(("127.0.0.1", 0), Handler)
        self.guard, self.connect_timeout, self.idle_timeout = guard, connect_timeout, idle_timeout

    def handle_error(self, request, client_address) -> None:
        log.debug("proxy: error on a connection from %s", client_address, exc_info=True)


@contextlib.contextmanager
def filtering_proxy(guard: AddressGuard, timeout: float) -> Iterator[str]:
    """Run the proxy in a background thread for the block; yields its URL (http://127.0.0.1:PORT)."""
    server = ProxyServer(guard, connect_timeout=timeout, idle_timeout=timeout + 5)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="rakt-download-proxy", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    log.info("download proxy on %s: every request and redirect is checked by the address guard", url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def proxy_environment(url: str) -> Iterator[None]:
    """Point urllib (in spawned workers too) at `url` for http, https and ftp, bypassing it for no host;
    the previous values are restored afterwards."""
    names = [*PROXY_VARS, *(n.upper() for n in PROXY_VARS), *NO_PROXY_VARS]
    old = {n: os.environ.get(n) for n in names}
    replaced = sorted({n for n in names if old[n] and n not in NO_PROXY_VARS})
    if replaced:
        log.warning("download: %s replaced by rakt's filtering proxy for this run (it connects directly)",
                    ", ".join(replaced))
    for name in names:
        os.environ[name] = "" if name in NO_PROXY_VARS else url
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
