"""MemoryFormat: the layout of a MemoryObj's tensor. Values are on the wire (DESIGN.md §4.4)."""

from enum import IntEnum


class MemoryFormat(IntEnum):
    """Layout of a MemoryObj (D = num_kv_heads * head_size of this rank, T = tokens, L = layers).

    UNDEFINED 0; KV_2LTD 1 ``[2, L, T, D]`` (non-layerwise); KV_T2D 2 ``[T, 2, D]`` (layerwise);
    KV_2TD 3 ``[2, T, D]`` (blend buffer); BINARY 4 (serialized bytes); BINARY_BUFFER 5;
    KV_MLA_FMT 6 ``[1, L, T, D_mla]``. The integer values match LMCache's and must not change.
    """

    UNDEFINED = 0
    KV_2LTD = 1
    KV_T2D = 2
    KV_2TD = 3
    BINARY = 4
    BINARY_BUFFER = 5
    KV_MLA_FMT = 6
