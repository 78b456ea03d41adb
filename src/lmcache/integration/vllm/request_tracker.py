"""RequestTracker: scheduler-side state of one request across steps (tokens, blocks, saved prefix)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RequestTracker:
    """Tracks what lmcache knows of one vLLM request between scheduler steps.

    Attributes:
        req_id: vLLM request id.
        prompt_len: prompt length in tokens.
        block_ids: the request's KV blocks (group 0), in order.
        num_saved_tokens: tokens already stored in lmcache (or known to be there).
        request_configs: ``lmcache.*`` request configs (tags).
    """

    req_id: str
    prompt_len: int
    block_ids: list[int] = field(default_factory=list)
    num_saved_tokens: int = 0
    request_configs: dict | None = None

    def update_blocks(self, new_block_ids: list[int] | None, replace: bool) -> None:
        """Append ``new_block_ids`` (or replace all blocks, after a preemption)."""
        if new_block_ids is None:
            return
        if replace:
            self.block_ids = list(new_block_ids)
        else:
            self.block_ids.extend(new_block_ids)

    def slot_mapping(self, num_tokens: int, block_size: int) -> torch.Tensor:
        """Flat slots of tokens [0, num_tokens): int64 CPU tensor ``[num_tokens]``.

        slot = block_id·block_size + offset (vLLM's paged layout).

        Raises:
            ValueError: the tracked blocks cover fewer than ``num_tokens`` tokens.
        """
        if num_tokens > len(self.block_ids) * block_size:
            raise ValueError(
                f"request {self.req_id}: {num_tokens} tokens need {-(-num_tokens // block_size)} blocks"
                f" of {block_size}, but only {len(self.block_ids)} are allocated")
        blocks = torch.tensor(self.block_ids, dtype=torch.int64)
        offsets = torch.arange(block_size, dtype=torch.int64)
        return (blocks[:, None] * block_size + offsets[None, :]).flatten()[:num_tokens]
