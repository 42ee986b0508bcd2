"""Filtering forward proxy for `rakt download`: closes the redirect / DNS re-resolution gap of the address guard.

img2dataset's urllib workers follow redirects and resolve hosts themselves. Run with this proxy (in the driver,
bound to 127.0.0.1) as their `http_proxy`/`https_proxy`/`ftp_proxy`, every request they make -- each redirect
hop is a new one -- reaches the proxy, which resolves the host itself, judges every address with the guard's
policy (`AddressGuard.judge`) and connects to an address it checked, never resolving again. Plain HTTP is
forwarded (absolute-URI requests), HTTPS tunnelled (CONNECT, checked at CONNECT time). A refused request gets
`403 rakt proxy refused: CAUSE (DETAIL)`, which urllib reports as `HTTP Error 403: rakt proxy refused: ...`
(plain HTTP) or `Tunnel connection failed: 403 rakt proxy refused: ...` (HTTPS); no connection is made.

Limits no server can stretch: a request (each redirect hop is one) gets `deadline` seconds in all -- connect,
response head and body -- and a body of at most `max_bytes`: an HTTP response that declares a larger
Content-Length is answered `502 rakt proxy: response too large`, one that runs over either limit while it is
relayed (or an HTTPS tunnel) is cut off, counted in `ProxyServer.cuts`. With `hosts` the proxy connects only to
those hosts (the manifest's) and to the targets of the redirects it relays (plain HTTP): anything else a worker
asks for -- a library's update check, an HTTPS redirect to another host -- is refused (`off_manifest_host`)
before any name is resolved.

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
import time
from collections import Counter
from typing import Iterator
from urllib.parse import urljoin, urlsplit

from rakt.pipeline.download.guard import BAD_SCHEME, BAD_URL, AddressGuard

log = logging.getLogger("rakt.download")

REFUSED_REASON = "rakt proxy refused"  # the reason phrase of the proxy's 403 answers
FAILED_REASON = "rakt proxy"  # ... and of its 502/504 answers (cannot connect)
MAX_HEAD = 64 * 1024  # bytes of request line + headers
CHUNK = 64 * 1024
HOP_HEADERS = {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "te", "trailer", "upgrade"}
PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy")  # ftp: urllib follows http -> ftp:// redirects
NO_PROXY_VARS = ("no_proxy", "NO_PROXY")
OFF_MANIFEST = "off_manifest_host"  # refusal cause: a host neither in the manifest nor a relayed redirect's target
REDIRECTS = (301, 302, 303, 307, 308)
MAX_CUT_EXAMPLES = 5


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


def host_key(host: str) -> str:
    """A host name as compared with the allowed hosts: lower case, no trailing dot, IDNA (punycode)."""
    host = host.lower().rstrip(".")
    with contextlib.suppress(UnicodeError):
        return host.encode("idna").decode("ascii")
    return host


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
        self.ends = time.monotonic() + (self.server.deadline or float("inf"))
        client.settimeout(self.server.idle_timeout)
        try:
            head, extra = self.read_head(client)
            method, target, version, headers = self.parse(head)
            if method == "CONNECT":
                host, port = self.connect_target(target)
                upstream = self.connect(host, port)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if extra:
                    upstream.sendall(extra)
                self.relay(client, upstream, f"https://{host}:{port}", 0)
            else:
                (host, port), path = self.forward_target(target)
                upstream = self.connect(host, port)
                upstream.sendall(self.forward_head(method, path, version, headers) + extra)
                answer, body = self.response_head(upstream, target)
                client.sendall(answer + body)
                self.relay(client, upstream, target, len(body))
        except Refused as e:
            self.answer(client, e.status, e.reason)
        except (OSError, ValueError, UnicodeError) as e:
            log.debug("proxy: connection dropped: %s", e)
        finally:
            if upstream is not None:
                upstream.close()

    def left(self) -> float:
        """Seconds until this request's deadline, at most the idle timeout."""
        return min(self.server.idle_timeout, self.ends - time.monotonic())

    def response_head(self, upstream: socket.socket, target: str) -> tuple[bytes, bytes]:
        """The upstream response head (up to the blank line) and the body bytes read with it; a declared body over
        the size cap is refused, a redirect's target host allowed."""
        buf = b""
        while b"\r\n\r\n" not in buf:
            if self.left() <= 0:
                raise Refused(504, f"{FAILED_REASON}: deadline of {self.server.deadline:g} s passed before the "
                                   f"response")
            if len(buf) > MAX_HEAD:
                raise Refused(502, f"{FAILED_REASON}: response head too large")
            upstream.settimeout(self.left())
            try:
                data = upstream.recv(CHUNK)
            except TimeoutError:
                if time.monotonic() < self.ends:
                    raise  # idle: dropped, as any silent connection
                continue  # the deadline: answered above
            if not data:
                raise ValueError("upstream closed before the end of the response head")
            buf += data
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        status = lines[0].split(" ", 2)
        code = int(status[1]) if len(status) > 1 and status[1].isdigit() else 0
        length = fields.get("content-length", "")
        if self.server.max_bytes and length.isdigit() and int(length) > self.server.max_bytes:
            raise Refused(502, f"{FAILED_REASON}: response too large ({int(length):,} bytes declared, the cap "
                               f"is {self.server.max_bytes:,})")
        if code in REDIRECTS and fields.get("location"):
            self.server.allow_redirect(urljoin(target, fields["location"]))
        return head + b"\r\n\r\n", body

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
        """Refuse a host off the manifest; resolve now, refuse a disallowed address, connect to a checked one."""
        if not self.server.host_allowed(host):
            log.debug("proxy refused %s:%d (not a host of the manifest)", host, port)
            raise Refused(403, f"{REFUSED_REASON}: {OFF_MANIFEST} ({host})")
        cause, addresses = self.server.guard.judge(host, port)
        if cause is not None:
            log.debug("proxy refused %s:%d (%s %s)", host, port, cause, " ".join(addresses))
            raise Refused(403, f"{REFUSED_REASON}: {cause} ({host} {' '.join(addresses)})".strip())
        error: OSError | None = None
        for address in addresses:
            try:
                return open_connection(address, port, min(self.server.connect_timeout, max(self.left(), 0.001)))
            except OSError as e:
                error = e
        if isinstance(error, TimeoutError):
            raise Refused(504, f"{FAILED_REASON}: cannot connect to {host}:{port}: timed out")
        raise Refused(502, f"{FAILED_REASON}: cannot connect to {host}:{port}: {error}")

    def relay(self, client: socket.socket, upstream: socket.socket, target: str, sent: int) -> None:
        """Copy bytes both ways until either side closes, nothing moves for `idle_timeout` seconds, the deadline
        passes or the upstream's bytes pass the size cap (`sent`: body bytes relayed already); a cut is counted."""
        server = self.server
        limit = server.max_bytes and server.max_bytes + (0 if target.startswith("http:") else  # TLS framing:
                                                         max(64 * 1024, server.max_bytes // 20))
        upstream.settimeout(server.idle_timeout)
        peers = {client.fileno(): (client, upstream), upstream.fileno(): (upstream, client)}
        poller = select.poll()  # not select(): no limit on descriptor numbers with many connections
        for fd in peers:
            poller.register(fd, select.POLLIN)
        while True:
            if time.monotonic() >= self.ends:
                return server.cut("deadline", target, sent)
            events = poller.poll(max(self.left(), 0.0) * 1000)
            if not events:  # idle, or the deadline came
                return server.cut("deadline", target, sent) if time.monotonic() >= self.ends else None
            for fd, _ in events:
                source, sink = peers[fd]
                data = source.recv(CHUNK)
                if not data:
                    return
                if source is upstream:
                    sent += len(data)
                    if limit and sent > limit:
                        return server.cut("too_large", target, sent)
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

    def __init__(self, guard: AddressGuard, connect_timeout: float, idle_timeout: float, deadline: float = 0,
                 max_bytes: int = 0, hosts: set[str] | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.guard, self.connect_timeout, self.idle_timeout = guard, connect_timeout, idle_timeout
        self.deadline, self.max_bytes = deadline, max_bytes
        self.hosts = None if hosts is None else {host_key(h) for h in hosts}
        self.cuts: Counter = Counter()
        self.cut_examples: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def host_allowed(self, host: str) -> bool:
        return self.hosts is None or host_key(host) in self.hosts

    def allow_redirect(self, url: str) -> None:
        """Let the proxy connect to the host a relayed redirect points at (plain HTTP: the proxy sees it)."""
        host = urlsplit(url).hostname
        if self.hosts is not None and host:
            with self.lock:
                self.hosts.add(host_key(host))

    def cut(self, cause: str, target: str, nbytes: int) -> None:
        """Count a response cut off at the deadline or the size cap."""
        log.warning("rakt proxy: %s cut off (%s, %s bytes relayed)", target[:200],
                    "deadline" if cause == "deadline" else "size cap", f"{nbytes:,}")
        with self.lock:
            self.cuts[cause] += 1
            examples = self.cut_examples.setdefault(cause, [])
            if len(examples) < MAX_CUT_EXAMPLES:
                examples.append(target[:200])

    def handle_error(self, request, client_address) -> None:
        log.debug("proxy: error on a connection from %s", client_address, exc_info=True)


@contextlib.contextmanager
def filtering_proxy(guard: AddressGuard, timeout: float, deadline: float = 0, max_bytes: int = 0,
                    hosts: set[str] | None = None) -> Iterator[ProxyServer]:
    """Run the proxy in a background thread for the block; yields the server (its URL: `.url`)."""
    server = ProxyServer(guard, connect_timeout=timeout, idle_timeout=timeout + 5, deadline=deadline,
                         max_bytes=max_bytes, hosts=hosts)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="rakt-download-proxy", daemon=True)
    thread.start()
    log.info("download proxy on %s: every request and redirect is checked by the address guard", server.url)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def proxy_environment(url: str) -> dict[str, str]:
    """The variables that point urllib (in the download's processes) at `url` for http, https and ftp, bypassing
    it for no host; a proxy of the user's is replaced (and says so)."""
    names = [*PROXY_VARS, *(n.upper() for n in PROXY_VARS)]
    replaced = sorted(n for n in names if os.environ.get(n))
    if replaced:
        log.warning("download: %s replaced by rakt's filtering proxy for this run (it connects directly)",
                    ", ".join(replaced))
    return {**dict.fromkeys(names, url), **dict.fromkeys(NO_PROXY_VARS, "")}
