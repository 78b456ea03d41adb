"""Cache keys: the names of KV chunks (CacheEngineKey, LayerCacheEngineKey).

String form (LMCache-compatible, see shared/DESIGN.md §4.3)::

    model_name@world_size@worker_id@<chunk_hash hex>@<dtype name>[@layer_id][@tag%value...]

* Tags are written in the order the request gave them (LMCache's insertion order);
  ``CacheEngineKey(..., request_configs={"lmcache.tag.user": "alice"})`` (LMCache's request
  configs) writes ``...@user%alice``. A parser accepts tags in any order (and keeps it).
* Parsers accept only the canonical form that ``to_string`` writes: decimal ints without sign,
  spaces or leading zeros, lowercase hex without ``0x``, known dtype names, nothing trailing;
  anything else is a ValueError that quotes the input.

* ``chunk_hash`` is lowercase hex without ``0x``, at most 64 digits; a negative hash (LMCache's ``builtin``
  algorithm) is ``-`` followed by the hex of its magnitude.
* In the model name and in tag values ``%`` is written ``%25`` and ``@`` is written ``%40``,
  so every name round-trips exactly; ``/`` stays as it is (as in LMCache).
* Tag names may not contain ``@`` or ``%`` (ValueError at construction).
* A LayerCacheEngineKey inserts ``@layer_id`` after the dtype name (before the tags).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Optional, Union

import torch

_NAME_TO_DTYPE: dict[str, torch.dtype] = {
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "double": torch.float64,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "fp8_e4m3fnuz": torch.float8_e4m3fnuz,
    "fp8_e5m2fnuz": torch.float8_e5m2fnuz,
}
_DTYPE_TO_NAME: dict[torch.dtype, str] = {v: k for k, v in _NAME_TO_DTYPE.items()}

# Canonical forms only (what to_string writes): no sign, no leading zeros, no spaces, lowercase.
# At most 64 hex digits (256 bits; lmcache's and LMCache's hashes have 64): a longer one is
# not a hash, and its key could not even be repr'd (int → decimal str is capped at 4300 digits).
_HASH_RE = re.compile(r"0|-?[1-9a-f][0-9a-f]{0,63}")
_INT_RE = re.compile(r"0|[1-9][0-9]*")
_ESCAPE_RE = re.compile(r"%(25|40)?")


def dtype_to_name(dtype: torch.dtype) -> str:
    """Return the key-string name of a torch dtype (e.g. ``torch.float16`` -> ``"half"``).

    Raises:
        ValueError: the dtype has no key name.
    """
    try:
        return _DTYPE_TO_NAME[dtype]
    except (KeyError, TypeError):
        raise ValueError(
            f"dtype {dtype!r} has no cache-key name; expected one of "
            f"{[str(d) for d in _DTYPE_TO_NAME]}"
        ) from None


def name_to_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_to_name` (e.g. ``"bfloat16"`` -> ``torch.bfloat16``).

    Raises:
        ValueError: unknown name.
    """
    try:
        return _NAME_TO_DTYPE[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dtype name {name!r}; expected one of {sorted(_NAME_TO_DTYPE)}"
        ) from None


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("@", "%40")


def _unescape(text: str, what: str, whole: str) -> str:
    def repl(m: re.Match) -> str:
        if m.group(1) is None:
            raise ValueError(f"bad escape in {what} {text!r} of key string {whole!r}")
        return "%" if m.group(1) == "25" else "@"

    return _ESCAPE_RE.sub(repl, text)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_worker(model_name: object, world_size: object, worker_id: object) -> None:
    """Check the identity of one worker (shared by CacheEngineKey and LMCacheMetadata).

    Raises:
        ValueError: ``model_name`` is not a non-empty str, ``world_size`` not an int >= 1, or
            ``worker_id`` not an int in ``[0, world_size)`` (bools are not ints here).
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty str, got {model_name!r}")
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not _is_int(worker_id) or not 0 <= worker_id < world_size:
        raise ValueError(f"worker_id must be an int in [0, {world_size}), got {worker_id!r}")


TAG_PREFIX = "lmcache.tag."


def _normalize_tags(
    request_configs: Union[Iterable[tuple[str, str]], Mapping[str, object], None],
) -> tuple[tuple[str, str], ...]:
    """Tags in the given order: from a Mapping (LMCache's request_configs) its
    ``lmcache.tag.<name>`` entries (value as ``str``), from an iterable its (name, value) pairs."""
    if request_configs is None:
        return ()
    if isinstance(request_configs, Mapping):
        items = [(k[len(TAG_PREFIX):], v if isinstance(v, str) else str(v))
                 for k, v in request_configs.items()
                 if isinstance(k, str) and k.startswith(TAG_PREFIX)]
    else:
        items = request_configs
    tags: dict[str, str] = {}
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(f"request_configs item {item!r} is not a (tag, value) pair")
        name, value = item
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"tag {name!r}={value!r}: tag name and value must both be str")
        if not name or "@" in name or "%" in name:
            raise ValueError(f"tag name {name!r} must be non-empty and contain no '@' or '%'")
        if name in tags:
            raise ValueError(f"tag {name!r} given twice in request_configs")
        tags[name] = value
    return tuple(tags.items())


@dataclass(frozen=True)
class CacheEngineKey:
    """Name of one KV chunk.

    Attributes:
        model_name: serving engine's model name (any str, ``/``, ``@``, ``%`` allowed).
        world_size: tensor-parallel world size, >= 1.
        worker_id: this worker's rank, 0 <= worker_id < world_size.
        chunk_hash: the chunk's prefix hash (int; negative only for the ``builtin`` algorithm).
        dtype: KV dtype; must have a name in :func:`dtype_to_name`.
        request_configs: tags ``((name, value), ...)`` in order, or LMCache's request_configs
            dict, whose ``lmcache.tag.<name>`` entries become the tags in insertion order.

    Raises:
        TypeError / ValueError on bad fields (message names the field and the value).
    """

    model_name: str
    world_size: int
    worker_id: int
    chunk_hash: int
    dtype: torch.dtype
    request_configs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        check_worker(self.model_name, self.world_size, self.worker_id)
        if not _is_int(self.chunk_hash):
            raise TypeError(f"chunk_hash must be an int, got {self.chunk_hash!r}")
        dtype_to_name(self.dtype)  # validates
        object.__setattr__(self, "request_configs", _normalize_tags(self.request_configs))

    # ---- string form -------------------------------------------------------------------
    def _head(self) -> str:
        h = self.chunk_hash
        hex_hash = format(h, "x") if h >= 0 else "-" + format(-h, "x")
        return (
            f"{_escape(self.model_name)}@{self.world_size}@{self.worker_id}"
            f"@{hex_hash}@{dtype_to_name(self.dtype)}"
        )

    def _tail(self) -> str:
        return "".join(f"@{name}%{_escape(value)}" for name, value in self.request_configs)

    def to_string(self) -> str:
        """The LMCache key string (see module docstring)."""
        return self._head() + self._tail()

    def __str__(self) -> str:
        return self.to_string()

    @staticmethod
    def from_string(s: str) -> "CacheEngineKey":
        """Parse a key string in the canonical form :meth:`to_string` writes (tags in any order).

        Returns a LayerCacheEngineKey when the string has a layer part.

        Raises:
            TypeError: ``s`` is not a str.
            ValueError: not a canonical key string (the message quotes it and says why).
        """
        if not isinstance(s, str):
            raise TypeError(f"key string must be str, got {type(s).__name__}")
        try:
            key = _parse(s)
        except (ValueError, TypeError) as e:
            raise ValueError(f"invalid key string {s!r}: {e}") from None
        if key.to_string() != s:
            raise ValueError(f"invalid key string {s!r}: not canonical (expected "
                             f"{key.to_string()!r})")
        return key

    # ---- derived keys -------------------------------------------------------------------
    def with_hash(self, chunk_hash: int) -> "CacheEngineKey":
        """Same key with another chunk_hash (same class, same layer id)."""
        return dataclasses.replace(self, chunk_hash=chunk_hash)

    def split_layers(self, num_layers: int) -> list["LayerCacheEngineKey"]:
        """One LayerCacheEngineKey per layer 0..num_layers-1.

        Raises:
            ValueError: num_layers < 1.
        """
        if not _is_int(num_layers) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(CacheEngineKey)}
        return [LayerCacheEngineKey(**fields, layer_id=i) for i in range(num_layers)]

    @property
    def tags(self) -> dict[str, str]:
        """request_configs as a dict {tag name: value}."""
        return dict(self.request_configs)


@dataclass(frozen=True)
class LayerCacheEngineKey(CacheEngineKey):
    """CacheEngineKey of one layer of a chunk; ``layer_id`` >= 0 is required.

    String: ``...@<dtype name>@<layer_id>[@tag%value...]``.
    """

    layer_id: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.layer_id) or self.layer_id < 0:
            raise ValueError(f"layer_id must be an int >= 0, got {self.layer_id!r}")

    def to_string(self) -> str:
        return f"{self._head()}@{self.layer_id}{self._tail()}"

    @staticmethod
    def from_string(s: str) -> "LayerCacheEngineKey":
        """Parse a canonical layer key string; ValueError (quoting it) when the layer part is
        missing or the string is not canonical."""
        key = CacheEngineKey.from_string(s)
        if not isinstance(key, LayerCacheEngineKey):
            raise ValueError(f"invalid layer key string {s!r}: it has no layer id")
        return key

    def split_layers(self, num_layers: int) -> list["LayerCacheEngineKey"]:
        raise TypeError(f"{self!s} is already a layer key; split_layers needs a CacheEngineKey")

    def to_chunk_key(self) -> CacheEngineKey:
        """The whole-chunk key this layer key was split from."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(CacheEngineKey)}
        return CacheEngineKey(**fields)


def _parse(s: str) -> CacheEngineKey:
    parts = s.split("@")
    if len(parts) < 5:
        raise ValueError(f"{len(parts)} '@'-separated parts, expected at least 5")
    model, ws, wid, hex_hash, dtype_name = parts[:5]
    for what, text in (("world_size", ws), ("worker_id", wid)):
        if not _INT_RE.fullmatch(text):
            raise ValueError(f"{what} {text!r} is not a canonical decimal int")
    if not _HASH_RE.fullmatch(hex_hash):
        raise ValueError(f"chunk hash {hex_hash!r} is not canonical lowercase hex")
    rest = parts[5:]
    layer_id: Optional[int] = None
    if rest and "%" not in rest[0]:
        if not _INT_RE.fullmatch(rest[0]):
            raise ValueError(f"layer id {rest[0]!r} is not a canonical decimal int")
        layer_id = int(rest[0])
        rest = rest[1:]
    tags = []
    for part in rest:
        name, sep, value = part.partition("%")
        if not sep:
            raise ValueError(f"tag part {part!r} lacks '%'")
        tags.append((name, _unescape(value, "tag value", s)))
    fields = dict(
        model_name=_unescape(model, "model name", s),
        world_size=int(ws),
        worker_id=int(wid),
        chunk_hash=int(hex_hash, 16),
        dtype=name_to_dtype(dtype_name),
        request_configs=tuple(tags),
    )
    if layer_id is not None:
        return LayerCacheEngineKey(**fields, layer_id=layer_id)
    return CacheEngineKey(**fields)
