"""Plain request data: what every step of the pipeline reads and returns, free of mitmproxy."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from urllib.parse import parse_qsl


@dataclass(frozen=True)
class Request:
    """One HTTP request as it travels through keycourier.

    `target` is the request target exactly as on the wire (raw, percent-encoded path plus
    `?query`); signatures are computed over it, so it is never decoded and re-encoded.
    `headers` keeps order and repeated names, as received.
    """

    method: str
    scheme: str
    host: str
    port: int
    target: str
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple, repr=False)  # may hold key material

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def raw_query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    @property
    def query(self) -> list[tuple[str, str]]:
        return parse_qsl(self.raw_query, keep_blank_values=True)

    def query_value(self, name: str) -> str | None:
        for key, value in self.query:
            if key == name:
                return value
        return None

    @cached_property
    def _values_by_name(self) -> dict[str, list[str]]:
        """Each header's values by lower-case name, in order: built once, as every step reads headers."""
        index: dict[str, list[str]] = {}
        for name, value in self.headers:
            index.setdefault(name.lower(), []).append(value)
        return index

    def header_values(self, name: str) -> list[str]:
        """Every value of the header, in order (repeated fields); [] if absent."""
        return self._values_by_name.get(name.lower(), [])

    def header(self, name: str) -> str | None:
        """The header's value, repeated fields joined with ',' as HTTP allows; None if absent."""
        values = self.header_values(name)
        return ",".join(values) if values else None

    def with_headers(self, **changes: str | None) -> Request:
        """A copy with headers set (value) or removed (None); names given with '_' for '-'."""
        return self.with_header_map({k.replace("_", "-"): v for k, v in changes.items()})

    def with_header_map(self, changes: dict[str, str | None]) -> Request:
        lowered = {k.lower(): (k, v) for k, v in changes.items()}
        kept = [(k, v) for k, v in self.headers if k.lower() not in lowered]
        added = [(k, v) for k, v in lowered.values() if v is not None]
        return replace(self, headers=tuple(kept + added))

    def with_target(self, target: str) -> Request:
        return replace(self, target=target)

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"
