"""Per-round summary, CSV files, rich table and output check of the long-document QA experiment.

Input rows are the per-request result dicts of :func:`lmcache.experiments.runner.run_pass_here`
(keys ``request_key``, ``round`` (0-based), ``prompt_tokens``, ``ttft_s``, ``prefill_s``,
``hit_tokens``, ``output_token_ids``, ...). Rounds are shown 1-based: round 1 is cold (every
document seen for the first time), later rounds are warm.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

ROUND_COLUMNS = (
    "round", "phase", "requests", "prompt_tokens_mean",
    "ttft_without_lmcache_s", "ttft_with_lmcache_s", "speedup",
    "hit_tokens_without_lmcache", "hit_tokens_with_lmcache", "hit_rate_with_lmcache",
    "outputs_identical",
)
REQUEST_COLUMNS = (
    "pass", "round", "request_key", "doc_index", "question_index", "prompt_tokens",
    "ttft_s", "prefill_s", "hit_tokens", "output_token_ids",
)
Rows = Sequence[dict[str, Any]]


def _by_round(rows: Rows | None) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for row in rows or ():
        out.setdefault(int(row["round"]), []).append(row)
    return out


def mismatched_outputs(without: Rows, with_: Rows) -> list[str]:
    """Request keys whose greedy output token ids differ between the two passes, in order;
    a request present in only one pass counts as a mismatch."""
    a = {r["request_key"]: list(r["output_token_ids"]) for r in without}
    b = {r["request_key"]: list(r["output_token_ids"]) for r in with_}
    keys = list(a) + [k for k in b if k not in a]
    return [k for k in keys if a.get(k) != b.get(k)]


def summarize_rounds(without: Rows | None, with_: Rows | None) -> list[dict[str, Any]]:
    """One summary dict per round (keys :data:`ROUND_COLUMNS`).

    TTFTs are means over the round's requests, in seconds; ``speedup`` = mean TTFT without /
    mean TTFT with lmcache; hit tokens are sums over the round; ``hit_rate_with_lmcache`` =
    hit tokens / prompt tokens of the lmcache pass. A value that needs a pass that was not run
    is None; ``outputs_identical`` is None unless both passes ran.

    Raises:
        ValueError: both passes are None or empty.
    """
    if not without and not with_:
        raise ValueError("summarize_rounds: expected the results of at least one pass")
    wo, wi = _by_round(without), _by_round(with_)
    summary = []
    for rnd in sorted(set(wo) | set(wi)):
        a, b = wo.get(rnd), wi.get(rnd)
        base = a or b
        ttft_a = mean(r["ttft_s"] for r in a) if a else None
        ttft_b = mean(r["ttft_s"] for r in b) if b else None
        identical = None
        if a and b:
            identical = not mismatched_outputs(a, b)
        hits_b = sum(int(r["hit_tokens"]) for r in b) if b else None
        prompt_b = sum(int(r["prompt_tokens"]) for r in b) if b else None
        summary.append({
            "round": rnd + 1,
            "phase": "cold" if rnd == 0 else "warm",
            "requests": len(base),
            "prompt_tokens_mean": mean(int(r["prompt_tokens"]) for r in base),
            "ttft_without_lmcache_s": ttft_a,
            "ttft_with_lmcache_s": ttft_b,
            "speedup": (ttft_a / ttft_b) if ttft_a is not None and ttft_b else None,
            "hit_tokens_without_lmcache": sum(int(r["hit_tokens"]) for r in a) if a else None,
            "hit_tokens_with_lmcache": hits_b,
            "hit_rate_with_lmcache": (hits_b / prompt_b) if prompt_b else None,
            "outputs_identical": identical,
        })
    return summary


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def write_csv(rows: Rows, path: str | os.PathLike, columns: Sequence[str] = ROUND_COLUMNS) -> Path:
    """Write ``rows`` as CSV with a header of ``columns`` (None → empty cell, floats with 6
    significant digits, lists space-separated); parent directories are created. Returns the path.

    Raises:
        ValueError: a row lacks one of ``columns`` (the message names it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"write_csv: row {i} lacks column(s) {missing}")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row[c]) for c in columns])
    return path


def request_rows(passes: dict[str, Rows | None]) -> list[dict[str, Any]]:
    """Flatten ``{pass name: per-request rows}`` into rows with :data:`REQUEST_COLUMNS`
    (``round`` 1-based, as in the summary)."""
    out = []
    for name, rows in passes.items():
        for r in rows or ():
            row = {"pass": name, **{c: r[c] for c in REQUEST_COLUMNS if c != "pass"}}
            row["round"] = int(r["round"]) + 1
            out.append(row)
    return out


def render_table(summary: Rows, title: str = "long-document QA: TTFT per round"):
    """A ``rich.table.Table`` of the per-round summary, narrow enough for 80 columns: TTFT in
    ms without (``w/o ms``) and with lmcache (``lmc ms``), speedup, hit tokens of the lmcache
    pass (the pass without lmcache has none: prefix caching is off) and whether the greedy
    outputs were identical."""
    from rich.table import Table

    def ms(v):
        return "—" if v is None else f"{v * 1e3:.1f}"

    table = Table(title=title, caption="TTFT: mean over the round; hits: tokens lmcache loaded")
    for name in ("round", "reqs", "prompt", "w/o ms", "lmc ms", "speedup", "hits", "same"):
        table.add_column(name, justify="right", no_wrap=True)
    for s in summary:
        speed = "—" if s["speedup"] is None else f"{s['speedup']:.2f}x"
        ident = {None: "—", True: "yes", False: "NO"}[s["outputs_identical"]]
        table.add_row(
            f"{s['round']} {s['phase']}", str(s["requests"]), f"{s['prompt_tokens_mean']:.0f}",
            ms(s["ttft_without_lmcache_s"]), ms(s["ttft_with_lmcache_s"]), speed,
            _cell(s["hit_tokens_with_lmcache"]) or "—", ident)
    return table
