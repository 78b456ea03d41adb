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
from statistics import mean, median, quantiles
from typing import Any

ROUND_COLUMNS = (
    "round", "phase", "requests", "prompt_tokens_mean",
    "ttft_without_lmcache_s", "ttft_without_lmcache_p25_s", "ttft_without_lmcache_p75_s",
    "ttft_with_lmcache_s", "ttft_with_lmcache_p25_s", "ttft_with_lmcache_p75_s",
    "speedup", "speedup_p25", "speedup_p75", "spread_exceeds_effect",
    "hit_tokens_without_lmcache", "hit_tokens_with_lmcache", "hit_rate_with_lmcache",
    "lookup_ms", "hash_ms", "load_ms", "store_ms", "lmcache_ms",
    "outputs_identical",
)
COST_COLUMNS = ("lookup_ms", "hash_ms", "load_ms", "store_ms")
SPENT_COLUMNS = ("lookup_ms", "load_ms", "store_ms")  # hashing runs inside these three
REQUEST_COLUMNS = (
    "pass", "repeat", "round", "request_key", "doc_index", "question_index", "prompt_tokens",
    "ttft_s", "prefill_s", "hit_tokens", *COST_COLUMNS, "output_token_ids",
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


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(p25, median, p75) of ``values`` (inclusive method; one value: that value thrice).

    Raises:
        ValueError: ``values`` is empty.
    """
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("quartiles: expected at least one value")
    if len(vals) == 1:
        return vals[0], vals[0], vals[0]
    p25, p50, p75 = quantiles(vals, n=4, method="inclusive")
    return p25, p50, p75


def _pair_key(row: dict[str, Any]) -> tuple[str, int]:
    return str(row["request_key"]), int(row.get("repeat", 0))


def summarize_rounds(without: Rows | None, with_: Rows | None) -> list[dict[str, Any]]:
    """One summary dict per round (keys :data:`ROUND_COLUMNS`), over every repeat.

    TTFTs (seconds): median and quartiles over the round's measurements of each pass.
    ``speedup``: median of the per-request ratios TTFT without / TTFT with lmcache, pairing the
    two passes' measurements of the same request and repeat (taken back to back), with its
    quartiles ``speedup_p25``/``speedup_p75``; ``spread_exceeds_effect`` is True when that
    interquartile range includes 1.0 (the difference is within the machine's noise).
    Hit tokens: mean per request; ``hit_rate_with_lmcache`` = hit tokens / prompt tokens of the
    lmcache pass. lmcache's cost (ms, :data:`COST_COLUMNS`; ``lmcache_ms`` = lookup + load +
    store, which include the hashing): medians per request of the lmcache pass. ``requests``: measurements per pass. A value that needs a
    pass that was not run is None; ``outputs_identical`` is None unless both passes ran.

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
        row: dict[str, Any] = {
            "round": rnd + 1, "phase": "cold" if rnd == 0 else "warm", "requests": len(base),
            "prompt_tokens_mean": mean(int(r["prompt_tokens"]) for r in base)}
        for tag, rows in (("without", a), ("with", b)):
            q = quartiles([r["ttft_s"] for r in rows]) if rows else (None,) * 3
            row[f"ttft_{tag}_lmcache_s"] = q[1]
            row[f"ttft_{tag}_lmcache_p25_s"], row[f"ttft_{tag}_lmcache_p75_s"] = q[0], q[2]
            row[f"hit_tokens_{tag}_lmcache"] = (
                mean(int(r["hit_tokens"]) for r in rows) if rows else None)
        ratios = []
        if a and b:
            by_key = {_pair_key(r): r for r in b}
            ratios = [r["ttft_s"] / by_key[_pair_key(r)]["ttft_s"] for r in a
                      if _pair_key(r) in by_key and by_key[_pair_key(r)]["ttft_s"] > 0]
        q = quartiles(ratios) if ratios else (None,) * 3
        row.update(speedup=q[1], speedup_p25=q[0], speedup_p75=q[2],
                   spread_exceeds_effect=(q[0] <= 1.0 <= q[2]) if ratios else None)
        prompt_b = sum(int(r["prompt_tokens"]) for r in b) if b else 0
        row["hit_rate_with_lmcache"] = (
            sum(int(r["hit_tokens"]) for r in b) / prompt_b if prompt_b else None)
        for col in COST_COLUMNS:
            row[col] = median(float(r.get(col, 0.0)) for r in b) if b else None
        row["lmcache_ms"] = (median(sum(float(r.get(c, 0.0)) for c in SPENT_COLUMNS) for r in b)
                             if b else None)
        row["outputs_identical"] = (not mismatched_outputs(a, b)) if a and b else None
        summary.append(row)
    return summary


def noise_notes(summary: Rows) -> list[str]:
    """One sentence per round whose speedup spread includes 1.0 (empty when none)."""
    notes = []
    for s in summary:
        if s.get("spread_exceeds_effect"):
            notes.append(
                f"note: round {s['round']} ({s['phase']}): the speedup's spread "
                f"{s['speedup_p25']:.2f}-{s['speedup_p75']:.2f} includes 1.00, so the difference "
                "between the passes there is within this machine's noise")
    return notes


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
    (``round`` 1-based, as in the summary; ``repeat`` 0 and costs 0.0 when absent)."""
    defaults = {"repeat": 0, **{c: 0.0 for c in COST_COLUMNS}}
    out = []
    for name, rows in passes.items():
        for r in rows or ():
            row = {"pass": name,
                   **{c: r.get(c, defaults.get(c)) for c in REQUEST_COLUMNS if c != "pass"}}
            row["round"] = int(r["round"]) + 1
            out.append(row)
    return out


def render_table(summary: Rows, title: str = "long-document QA: TTFT per round"):
    """A ``rich.table.Table`` of the per-round summary, fits 80 columns: median
    TTFT in ms without (``w/o ms``) and with lmcache (``lmc ms``), the median of the paired
    speedups and their interquartile range (``spread``), mean hit tokens per request of the
    lmcache pass (the pass without lmcache has none: prefix caching is off), lmcache's own
    median cost per request in ms (``cost``) and whether the greedy outputs were identical."""
    from rich.table import Table

    def ms(v):
        return "—" if v is None else f"{v * 1e3:.1f}"

    table = Table(title=title, caption="n: measurements per pass; TTFT: median; speedup: "
                  "median of paired ratios, spread: p25-p75; cost: lmcache ms per request")
    for name in ("round", "n", "w/o ms", "lmc ms", "speedup", "spread", "hits", "cost", "same"):
        table.add_column(name, justify="right", no_wrap=True)
    for s in summary:
        speed = "—" if s["speedup"] is None else f"{s['speedup']:.2f}x"
        spread = ("—" if s["speedup"] is None
                  else f"{s['speedup_p25']:.2f}-{s['speedup_p75']:.2f}")
        ident = {None: "—", True: "yes", False: "NO"}[s["outputs_identical"]]
        hits = s["hit_tokens_with_lmcache"]
        cost = s["lmcache_ms"]
        table.add_row(
            f"{s['round']} {s['phase']}", str(s["requests"]), ms(s["ttft_without_lmcache_s"]), ms(s["ttft_with_lmcache_s"]), speed, spread,
            "—" if hits is None else f"{hits:.0f}", "—" if cost is None else f"{cost:.1f}", ident)
    return table


def render_costs(summary: Rows, title: str = "lmcache's own cost per request (median ms)"):
    """A ``rich.table.Table`` of lmcache's cost per request by round (lmcache pass): lookup,
    chunking + hashing (a part of lookup, load and store), load (retrieve), store, the total
    (lookup + load + store) and its share of the median TTFT."""
    from rich.table import Table

    table = Table(title=title, caption="from lmcache's timers: lookup_seconds, "
                  "process_tokens_seconds (hashing, inside the others), retrieve_seconds, "
                  "store_seconds; total = lookup + load + store")
    for name in ("round", "lookup", "hashing", "load", "store", "total", "% of TTFT"):
        table.add_column(name, justify="right", no_wrap=True)
    for s in summary:
        if s["lmcache_ms"] is None:
            continue
        ttft = s["ttft_with_lmcache_s"]
        share = "—" if not ttft else f"{100 * s['lmcache_ms'] / (ttft * 1e3):.1f}"
        table.add_row(f"{s['round']} {s['phase']}",
                      *(f"{s[c]:.2f}" for c in (*COST_COLUMNS, "lmcache_ms")), share)
    return table
