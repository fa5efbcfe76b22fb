"""Where a connection goes, and whether keycourier polices it: the one predicate that decides both
interception (which connections are parsed as HTTP) and policy (which requests the pipeline judges).

A connection is an object store's when the host it goes to, the TLS server name the client asked for,
or the address it actually reached belongs to an endpoint of the policy, in any spelling. Such a
connection is never relayed raw. When the policy names the host exactly as it is addressed, its
requests are judged by the rules; when the endpoint is reached under another name (another name for
its address, a mismatching server name), keycourier cannot know how the provider will read the
request, so every request on it is refused (see docs/security.md).
"""
from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from keycourier.hostnames import canonical_host, is_ip_literal
from keycourier.policy import Endpoint, Policy, is_glob


@dataclass(frozen=True)
class Destination:
    """A connection as keycourier sees it, every name in canonical form."""

    host: str  # what the client asked to reach: CONNECT target, absolute URI host, or reverse-proxy upstream
    port: int
    server_name: str | None = None  # the TLS SNI the client sent, when it is tunnelling TLS to the host
    address: str | None = None  # the IP address the connection actually reached, once known

    @classmethod
    def of(cls, host: str, port: int, server_name: str | None = None, address: str | None = None) -> Destination:
        return cls(canonical_host(host), port, server_name and canonical_host(server_name),
                   address and canonical_host(address))


@dataclass(frozen=True)
class Interception:
    """The predicate's answer. `endpoint` None: not an object store, relayed untouched. `refusal`: an
    object store reached in a way keycourier cannot classify as the provider will; every request refused."""

    endpoint: Endpoint | None
    refusal: str | None = None


NOT_AN_ENDPOINT = Interception(None)


class EndpointAddresses:
    """The IP addresses of the endpoints that name one host (a glob names no address). Refreshed from
    DNS by the caller; IP-literal endpoints need no resolution."""

    def __init__(self, resolve: Callable[[str], Iterable[str]] | None = None):
        self._resolve = resolve or resolve_host
        self._by_host: dict[str, frozenset[str]] = {}

    def refresh(self, policy: Policy) -> list[str]:
        """Resolves every named endpoint host again; returns the names that did not resolve."""
        resolved, failed = {}, []
        for host in {endpoint_host(e) for e in policy.endpoints if not is_glob(e.host)} - {None}:
            if is_ip_literal(host):
                continue
            try:
                resolved[host] = frozenset(canonical_host(ip) for ip in self._resolve(host))
            except OSError:
                failed.append(host)
        self._by_host = resolved
        return failed

    def endpoint_at(self, policy: Policy, address: str, port: int) -> Endpoint | None:
        for endpoint in policy.endpoints:
            host = endpoint_host(endpoint)
            if host is None or is_glob(endpoint.host) or not endpoint.takes_port(port):
                continue
            if address == host or address in self._by_host.get(host, ()):
                return endpoint
        return None


def endpoint_host(endpoint: Endpoint) -> str | None:
    """The host part of an endpoint's host[:port] glob, canonical."""
    return canonical_host(endpoint.host.rpartition(":")[0] if ":" in endpoint.host else endpoint.host)


def resolve_host(host: str) -> list[str]:
    """Every address `host` resolves to, in the resolver's order (what a connection would try)."""
    return list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)))


def intercept(policy: Policy, addresses: EndpointAddresses, destination: Destination) -> Interception:
    """The one predicate: is this connection an object store's, and may its requests be judged by the rules?"""
    by_name = policy.endpoint_for(destination.host, destination.port)
    if by_name and destination.server_name in (None, destination.host):
        return Interception(by_name)
    by_server_name = destination.server_name and policy.endpoint_for(destination.server_name, destination.port)
    by_address = destination.address and addresses.endpoint_at(policy, destination.address, destination.port)
    endpoint = by_name or by_server_name or by_address
    if endpoint is None:
        return NOT_AN_ENDPOINT
    if by_name or by_server_name:
        why = (f"the TLS server name {destination.server_name} differs from the host {destination.host} the "
               f"connection goes to, and one of them is an object store endpoint of the policy")
    else:
        why = (f"{destination.host} reaches {destination.address}, the address of the policy's endpoint "
               f"{endpoint.host}, under a name the policy does not give it; address the endpoint as the policy names it")
    return Interception(endpoint, refusal=why)
