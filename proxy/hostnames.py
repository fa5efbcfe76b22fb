"""Host names in the one spelling keycourier matches and classifies."""
from __future__ import annotations

import ipaddress
import re
import socket

_LOOSE_IPV4 = re.compile(r"(?:0x[0-9a-f]+|[0-9]+)(?:\.(?:0x[0-9a-f]+|[0-9]+)){0,3}")


def canonical_host(host: str) -> str:
    """The one spelling keycourier matches and classifies: lower case, no trailing dot, IP literals in
    standard form (IPv4 in every form the C resolver accepts, such as 2130706433, 0x7f.1 or 0177.0.0.1;
    IPv6 without brackets or zone; IPv4-mapped IPv6 as IPv4)."""
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    name = name.rstrip(".")
    address = _ip_literal(name)
    return str(address) if address else name


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
