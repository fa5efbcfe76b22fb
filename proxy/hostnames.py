"""Host names in the one spelling keycourier matches and classifies."""
from __future__ import annotations

import functools
import ipaddress
import re
import socket

_LOOSE_IPV4 = re.compile(r"(?:0x[0-9a-f]+|[0-9]+)(?:\.(?:0x[0-9a-f]+|[0-9]+)){0,3}")
MAX_CACHED_NAME = 255  # DNS names have at most 253 characters: a client's longer "names" are not kept


def canonical_host(host: str) -> str:
    """The one spelling keycourier matches and classifies: lower case, no trailing dot, IP literals in
    standard form (IPv4 in every form the C resolver accepts, such as 2130706433, 0x7f.1 or 0177.0.0.1;
    IPv6 without brackets or zone; IPv4-mapped IPv6 as IPv4)."""
    return _remembered_canonical_host(host) if len(host) <= MAX_CACHED_NAME else _canonical_host(host)


def _canonical_host(host: str) -> str:
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    name = name.rstrip(".")
    address = _ip_literal(name)
    return str(address) if address else name


# Every request's host, server name and address are canonicalised: a few distinct names, looked up again and again.
_remembered_canonical_host = functools.lru_cache(maxsize=1024)(_canonical_host)


def _ip_literal(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(name.partition("%")[0])
    except ValueError:
        if not _LOOSE_IPV4.fullmatch(name):
            return None
        try:
            return ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            return None
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def is_ip_literal(host: str) -> bool:
    return _ip_literal(host) is not None
