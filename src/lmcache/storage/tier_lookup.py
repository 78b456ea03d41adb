"""TierLookup: which tier answers for each chunk of a prefix, and the pins that lookups take.

* :meth:`TierLookup.select` turns ``retrieve_locations`` / ``store_location`` (backend names as
  ``backend.name``: ``LocalCPUBackend``, ``LocalDiskBackend``, ``RemoteBackend``, ...) into the
  tiers they name, in tier order (LMCache semantics).
* :meth:`TierLookup.owners` finds the contiguous hit prefix of a run of chunks: the first tier
  (of the selected ones) whose ``batched_contains`` counts chunks answers for them; the first
  chunk no tier holds ends the prefix. With ``pin`` each counted chunk is pinned in the tier
  that answered, recorded in the :class:`~lmcache.storage.pin_ledger.PinLedger`.
* :meth:`TierLookup.unpin_key` gives each pin back to the tier that took it.

A tier that raises is reported to ``tier_error`` and treated as a miss (a failing tier costs
hits only).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Optional, Union

from lmcache.keys import CacheEngineKey
from lmcache.storage.backends.base import StorageBackendInterface
from lmcache.storage.pin_ledger import PinLedger

Locations = Union[str, Sequence[str], None]
TierError = Callable[[StorageBackendInterface, str, Exception], None]


class TierLookup:
    """Tier selection by name, prefix lookup over the tiers, pin bookkeeping.

    Args:
        backends: the tiers, fastest first (list order is tier order).
        tier_error: called with ``(backend, op, error)`` when a tier call raises.
        pins: the ledger of lookup pins (default: a new PinLedger).
    """

    def __init__(self, backends: Sequence[StorageBackendInterface], tier_error: TierError,
                 pins: Optional[PinLedger] = None) -> None:
        self.backends = list(backends)
        self.tier_error = tier_error
        self.pins = pins if pins is not None else PinLedger()

    @property
    def tier_names(self) -> list[str]:
        """``name`` of each tier, in tier order."""
        return [b.name for b in self.backends]

    def select(self, locations: Locations, what: str = "retrieve_locations"
               ) -> list[StorageBackendInterface]:
        """The tiers named by ``locations`` (a name or a list of names), in tier order; all
        tiers for None.

        Raises:
            TypeError: a name is not a str.  ValueError: empty, or a name no tier has.
        """
        if locations is None:
            return self.backends
        names = [locations] if isinstance(locations, str) else list(locations)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"{what} must be backend names (str), got {bad!r}")
        if not names:
            raise ValueError(f"{what} must name at least one tier; the tiers are "
                             f"{self.tier_names}")
        unknown = [n for n in names if n not in self.tier_names]
        if unknown:
            raise ValueError(f"{what} names unknown tier(s) {unknown}; the tiers are "
                             f"{self.tier_names}")
        return [b for b in self.backends if b.name in names]

    def owners(self, keys: Sequence[CacheEngineKey], pin: bool,
               tiers: Sequence[StorageBackendInterface],
               lookup_id: Optional[Hashable] = None) -> list[StorageBackendInterface]:
        """The tier answering for each chunk of the contiguous hit prefix of ``keys`` (searched
        in ``tiers``); with ``pin`` each is pinned there and recorded under ``lookup_id``."""
        owners: list[StorageBackendInterface] = []
        n = len(keys)
        while len(owners) < n:
            pos = len(owners)
            for backend in tiers:
                try:
                    hit = backend.batched_contains(keys[pos:], pin=pin)
                except Exception as e:  # noqa: BLE001
                    self.tier_error(backend, "batched_contains", e)
                    continue
                if hit > 0:
                    owners.extend([backend] * min(hit, n - pos))
                    if pin:
                        self.pins.record(keys[pos:pos + hit], backend, lookup_id)
                    break
            else:
                break
        return owners

    def unpin_key(self, key: CacheEngineKey, lookup_id: Optional[Hashable] = None) -> None:
        """Remove one pin of ``key``: from the tier the ledger recorded for ``lookup_id`` (else
        for no lookup_id); a pin taken past the ledger from the first tier holding one."""
        backend = self.pins.pop(key, lookup_id)
        if backend is not None:
            self._unpin_in(backend, key)
            return
        for backend in self.backends:
            if self._unpin_in(backend, key):
                break

    def _unpin_in(self, backend: StorageBackendInterface, key: CacheEngineKey) -> bool:
        try:
            return backend.unpin(key)
        except Exception as e:  # noqa: BLE001
            self.tier_error(backend, "unpin", e)
            return False
