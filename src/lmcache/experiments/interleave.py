"""Order of the measurements of the long-document QA experiment: repeats and interleaved passes.

A *repeat* runs every round once more on fresh documents: repeat ``r >= 1`` replaces token 1 of
every document (the first after ``bos``) by a salt token, so its prefix hashes, and hence its
chunks, are new to lmcache and the cold round is cold again; repeat 0 keeps the documents as
they are. Within a repeat, rounds run in order (round 1 cold, later rounds warm) and every
request is sent to each pass in turn, alternating which pass goes first (ABBA), so a burst of
machine load lands on both passes alike and the per-request ratio of their TTFTs compares two
measurements taken seconds apart.

With a *bracket* pass (the one without a KV connector: measuring it again changes nothing, as
it caches nothing) every request is sent to it before and after the other passes (A B A); its
two TTFTs are merged into their geometric mean (:func:`merge_bracket`), so a load that rises or
falls during the step cancels out of the ratio, and the baseline's noise is averaged over two
measurements.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

Job = dict[str, Any]


def salt_token(original: int, repeat: int, vocab_size: int) -> int:
    """The token that replaces ``original`` in repeat ``repeat`` (>= 1): in ``[3, vocab_size)``
    (above the usual special ids 0-2) and different from ``original``.

    Raises:
        ValueError: ``repeat`` < 1 or ``vocab_size`` < 5.
    """
    if repeat < 1 or vocab_size < 5:
        raise ValueError(f"salt_token: expected repeat >= 1 and vocab_size >= 5, got repeat="
                         f"{repeat}, vocab_size={vocab_size}")
    span = vocab_size - 3
    token = 3 + (original + repeat * 7919) % span
    return token if token != original else 3 + (token - 2) % span


def plan(requests: Sequence[Job], repeats: int, passes: Sequence[str],
         vocab_size: int, bracket: str | None = None) -> list[tuple[tuple[str, ...], Job]]:
    """The measurement order: a list of ``(pass order, request)``.

    ``requests``: dicts with ``request_key``, ``round`` (0-based), ``doc_index`` and
    ``prompt_token_ids`` (first token ``bos``), in round order. Each returned request is a copy
    with ``repeat`` (0-based) added and, for ``repeat >= 1``, its token 1 salted
    (:func:`salt_token`). The pass order alternates request by request: ``passes``, then
    reversed, ... (with one pass, always that one). With ``bracket`` (one of ``passes``, which
    must not cache anything) and another pass, every order is ``(bracket, others...,
    bracket)``.

    Raises:
        ValueError: ``repeats`` < 1, no passes, a prompt shorter than 2 tokens, or a
        ``bracket`` that is not one of ``passes``.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: expected an integer >= 1")
    if not passes:
        raise ValueError("plan: expected at least one pass")
    if bracket is not None and bracket not in passes:
        raise ValueError(f"plan: bracket={bracket!r} is not one of the passes {list(passes)}")
    others = [p for p in passes if p != bracket]
    ordered = sorted(requests, key=lambda r: int(r["round"]))
    out: list[tuple[tuple[str, ...], Job]] = []
    for rep in range(repeats):
        for req in ordered:
            ids = list(req["prompt_token_ids"])
            if len(ids) < 2:
                raise ValueError(f"request {req['request_key']}: prompt of {len(ids)} tokens, "
                                 "expected at least 2")
            if rep:
                ids[1] = salt_token(ids[1], rep, vocab_size)
            if bracket is not None and others:
                order = (bracket, *others, bracket)
            else:
                order = tuple(passes) if len(out) % 2 == 0 else tuple(reversed(passes))
            out.append((order, {**req, "repeat": rep, "prompt_token_ids": ids}))
    return out


def run_plan(steps: Sequence[tuple[tuple[str, ...], Job]], run: Callable[[str, Job], dict],
             on_result: Callable[[str, dict], None] | None = None) -> dict[str, list[dict]]:
    """Run every step: ``run(pass name, request)`` for each pass of the step's order.

    Returns ``{pass name: [result rows in plan order]}``, one row per pass and step (a pass run
    twice in a step: :func:`merge_bracket` of its two rows); ``on_result(pass, row)`` is called
    with each such row after its step (e.g. for a progress line).
    """
    results: dict[str, list[dict]] = {}
    for order, req in steps:
        rows: dict[str, dict] = {}
        for name in order:
            row = run(name, req)
            rows[name] = merge_bracket(rows[name], row) if name in rows else row
        for name, row in rows.items():
            results.setdefault(name, []).append(row)
            if on_result is not None:
                on_result(name, row)
    return results


def merge_bracket(first: dict, second: dict) -> dict:
    """One row of two measurements of the same request by the same pass: ``first`` with
    ``ttft_s`` and ``prefill_s`` (seconds) the geometric means of both rows'."""
    out = dict(first)
    for key in ("ttft_s", "prefill_s"):
        a, b = first.get(key), second.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b > 0:
            out[key] = math.sqrt(a * b)
    return out
