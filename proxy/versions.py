"""Which key version each object was last written or read with, so a read after a key rotation goes
straight to the right version: a bounded LRU, in memory (a restart only costs the first read of each
object one fallback again)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from keycourier.dialects import ObjectRef

PLAINTEXT = "plaintext"  # the object is stored without a customer key
DEFAULT_SIZE = 100_000


@dataclass(frozen=True)
class KeyChoice:
    """The key a request gives an object: `version` None means no key (a plaintext object)."""

    where: ObjectRef
    key_name: str
    version: str | None
    fingerprint: str | None = None

    @property
    def remembered_as(self) -> str:
        return self.version or PLAINTEXT


class KeyVersions:
    def __init__(self, size: int = DEFAULT_SIZE):
        self.size = size
        self._versions: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()

    def recall(self, where: ObjectRef, key_name: str) -> str | None:
        with self._lock:
            found = self._versions.get((where, key_name))
            if found is not None:
                self._versions.move_to_end((where, key_name))
            return found

    def remember(self, choice: KeyChoice) -> None:
        with self._lock:
            self._versions[(choice.where, choice.key_name)] = choice.remembered_as
            self._versions.move_to_end((choice.where, choice.key_name))
            if len(self._versions) > self.size:
                self._versions.popitem(last=False)

    def __len__(self) -> int:
        return len(self._versions)
