"""Address guard for `rakt download` (SSRF): refuse URLs that would make the downloader reach private networks.

Every URL's host is resolved once (cached per host and port, a small thread pool), before anything is fetched.
A URL is refused when its scheme is not http/https, its host does not resolve, or any address it resolves to is
private, loopback, link-local (169.254.0.0/16 with the cloud metadata service, fe80::/10), multicast, reserved,
unspecified or otherwise not global -- unless `allow_private` is set or the address lies in an allowed network.
"Not global" is decided from fixed tables (`is_public`), never from `ipaddress.is_global`, whose answer changed
between Python patch versions; IPv6 addresses that carry IPv4 (mapped, compatible, NAT64, 6to4, Teredo) are
judged by the IPv4 they carry.

The downloader (img2dataset's urllib workers) resolves hosts again when it connects and follows HTTP redirects;
`rakt.pipeline.download.proxy` closes that gap: its filtering proxy judges every request (each redirect hop) with
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


# Not globally reachable (IANA special-purpose registries), written out so that the verdict is the same on every
# Python: `ipaddress.is_global` / `is_private` changed between patch versions.
NON_GLOBAL_V4 = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4"))
GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")  # everything outside (fc00::/7, fec0::/10, fe80::/10, ff00::/8,
# 100::/64, ...) is refused unless it carries an IPv4 address below
NON_GLOBAL_V6 = tuple(ipaddress.IPv6Network(n) for n in (
    "2001::/23", "2001:db8::/32", "3fff::/20"))  # protocol assignments (ORCHID, benchmarking, ...), documentation
SIXTOFOUR, TEREDO = ipaddress.IPv6Network("2002::/16"), ipaddress.IPv6Network("2001::/32")
# prefixes whose last 32 bits are an IPv4 address the packet ends up at
EMBEDS_V4_LOW32 = tuple(ipaddress.IPv6Network(n) for n in (
    "::ffff:0:0/96",  # IPv4-mapped
    "::/96",  # IPv4-compatible (deprecated; :: and ::1 fall in 0.0.0.0/8)
    "64:ff9b::/96",  # NAT64 well-known prefix
))


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 address(es) an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo server and client),
    or None when it carries none."""
    if addr in SIXTOFOUR:
        return [ipaddress.IPv4Address((int(addr) >> 80) & 0xFFFFFFFF)]
    if addr in TEREDO:
        bits = int(addr)
        return [ipaddress.IPv4Address((bits >> 64) & 0xFFFFFFFF), ipaddress.IPv4Address(~bits & 0xFFFFFFFF)]
    if any(addr in net for net in EMBEDS_V4_LOW32):
        return [ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)]
    return None


def is_public(addr: Address) -> bool:
    """True for a globally routable unicast address, decided from fixed tables (not `ipaddress.is_global`): IPv4
    outside the special-purpose ranges; IPv6 in 2000::/3 outside its special-purpose ranges; an IPv6 address that
    carries IPv4 (IPv4-mapped or -compatible, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo 2001::/32) only when
    every IPv4 address it carries is public."""
    if isinstance(addr, ipaddress.IPv4Address):
        return not any(addr in net for net in NON_GLOBAL_V4)
    carried = embedded_ipv4(addr)
    if carried is not None:
        return all(is_public(v4) for v4 in carried)
    return addr in GLOBAL_UNICAST_V6 and not any(addr in net for net in NON_GLOBAL_V6)


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
