"""Address guard for `rakt download` (SSRF): refuse URLs that would make the downloader reach private networks.

Every URL's host is resolved once (cached per host and port, a small thread pool), before anything is fetched.
A URL is refused when its scheme is not http/https, its host does not resolve, or any address it resolves to is
private, loopback, link-local (169.254.0.0/16 with the cloud metadata service, fe80::/10), multicast, reserved,
unspecified or otherwise not global -- unless `allow_private` is set or the address lies in an allowed network.

The downloader (img2dataset's urllib workers) resolves hosts again when it connects and follows HTTP redirects;
`pipeline.download.proxy` closes that gap: its filtering proxy judges every request (each redirect hop) with
`AddressGuard.judge`, the same policy, and connects to the address it checked.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable
from urllib.parse import urlsplit

log = logging.getLogger("rakt.download")

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
# refusal causes, as counted in download_report.json
BAD_SCHEME, BAD_URL, UNRESOLVABLE, BLOCKED, NO_URL = (
    "bad_scheme", "bad_url", "unresolvable_host", "blocked_address", "no_url")
RESOLVE_THREADS = 16
UNSAFE_URL = re.compile(r"[\x00-\x20\x7f]")
UNSAFE_NETLOC = re.compile(r"[@\\]")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


def parse_networks(cidrs: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """CIDR strings -> networks; a malformed one raises ValueError naming it."""
    nets = []
    for cidr in cidrs:
        try:
            nets.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
        except ValueError:
            raise ValueError(f"not a network in CIDR notation: {cidr!r} (e.g. 127.0.0.0/8, 10.0.0.0/8, ::1/128)")
    return nets


def system_resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, as the connecting downloader would see them (getaddrinfo)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def is_public(addr: Address) -> bool:
    """True for a globally routable unicast address; IPv4-mapped IPv6 addresses are judged as their IPv4."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast
                                   or addr.is_reserved or addr.is_unspecified)


class AddressGuard:
    """Decides per URL: None (may be fetched) or the cause of its refusal."""

    def __init__(self, allow_private: bool = False, allow_networks: Iterable[str] = (),
                 resolve: Resolver = system_resolve):
        self.allow_private = allow_private
        self.allowed = parse_networks(allow_networks)
        self.resolve = resolve
        self.hosts: dict[tuple[str, int], str | None] = {}

    def address_ok(self, text: str) -> bool:
        addr = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 scope id (fe80::1%eth0)
        if self.allow_private or any(addr in net for net in self.allowed):
            return True
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            if any(addr.ipv4_mapped in net for net in self.allowed):
                return True
        return is_public(addr)

    def split(self, url: str | None) -> tuple[str | None, tuple[str, int] | None]:
        """(cause, None) for a URL refused on its form alone, else (None, (host, port)) to resolve."""
        if url is None or not str(url).strip():
            return NO_URL, None
        url = str(url).strip()
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return BAD_URL, None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            return BAD_SCHEME, None
        # refuse what urllib may parse differently from urlsplit: userinfo, backslashes, spaces, control bytes
        if not parts.hostname or UNSAFE_URL.search(url) or UNSAFE_NETLOC.search(parts.netloc):
            return BAD_URL, None
        return None, (parts.hostname, port or DEFAULT_PORTS[scheme])

    def judge(self, host: str, port: int) -> tuple[str | None, list[str]]:
        """Resolve `host` now (no cache) and judge every address: (None, addresses to connect to) or
        (cause, the refused addresses)."""
        try:
            addresses = self.resolve(host, port)
        except (OSError, UnicodeError) as e:  # socket.gaierror, an IDNA name that cannot be encoded
            log.debug("cannot resolve %s: %s", host, e)
            addresses = []
        if not addresses:
            return UNRESOLVABLE, []
        bad = [a for a in addresses if not self.address_ok(a)]
        if bad:
            log.debug("host %s resolves to refused address(es) %s", host, ", ".join(bad))
            return BLOCKED, bad
        return None, addresses

    def host_verdict(self, host: tuple[str, int]) -> str | None:
        """Judge one host (cached): None or the refusal cause."""
        if host not in self.hosts:
            self.hosts[host] = self.judge(*host)[0]
        return self.hosts[host]

    def check_all(self, urls: list[str | None], threads: int = RESOLVE_THREADS) -> list[str | None]:
        """The verdict for every URL (None = may be fetched), resolving each distinct host once."""
        split = [self.split(u) for u in urls]
        todo = sorted({host for cause, host in split if cause is None and host not in self.hosts})
        if todo:
            with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as pool:
                list(pool.map(self.host_verdict, todo))
        return [cause if cause is not None else self.hosts[host] for cause, host in split]
