"""Quality, per-pass summary, table, CSV and plot of the RAG blend experiment.

Input rows are :meth:`lmcache.experiments.rag_blend_engine.RagPassEngine.run` results with
``pass``, ``ratio`` (None unless CacheBlend) and ``repeat``. Quality is measured against the
``no_cache`` pass's row of the same request and repeat (:func:`add_quality`): the other
passes were teacher-forced with the no-cache greedy output ``O`` (32 tokens).

* ``agreement``: fraction of the steps at which the pass's greedy choice (rank-1 token) after
  ``O[:t]`` is ``O[t]``; 1.0 means the pass's own greedy output is ``O`` exactly.
* ``nll``: mean negative log-likelihood per token (nats) of ``O`` under the pass's KV;
  ``delta_nll`` = ``nll`` - the no-cache pass's (0 = no loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

from lmcache.experiments.report import quartiles

PASS_COLUMNS = (
    "pass", "ratio", "requests", "prompt_tokens_mean",
    "ttft_mean_ms", "ttft_median_ms", "ttft_p25_ms", "ttft_p75_ms",
    "speedup_vs_no_cache", "speedup_p25", "speedup_p75",
    "hit_tokens_mean", "reused_tokens_mean", "recomputed_tokens_mean",
    "agreement_mean", "agreement_min", "identical_outputs", "nll_mean", "delta_nll_mean",
    "check",
)
REQUEST_COLUMNS = (
    "pass", "ratio", "repeat", "request_key", "prompt_tokens", "ttft_s", "prefill_s",
    "hit_tokens", "reused_tokens", "recomputed_tokens", "blended", "agreement", "nll",
    "delta_nll", "output_token_ids", "top1_token_ids",
)
Rows = Sequence[dict[str, Any]]


def _key(row: dict[str, Any]) -> tuple[str, int]:
    return str(row["request_key"]), int(row.get("repeat", 0))


def add_quality(by_pass: dict[str, list[dict[str, Any]]], reference: str = "no_cache") -> None:
    """Add ``agreement``, ``nll``, ``delta_nll`` to every row (in place), against the
    ``reference`` pass's row of the same request and repeat.

    Raises:
        ValueError: the reference pass is missing, or a row has no reference row.
    """
    if reference not in by_pass:
        raise ValueError(f"add_quality: no {reference!r} pass to compare with")
    ref = {_key(r): r for r in by_pass[reference]}
    for rows in by_pass.values():
        for row in rows:
            base = ref.get(_key(row))
            if base is None:
                raise ValueError(f"add_quality: {row['request_key']} (repeat "
                                 f"{row.get('repeat', 0)}) has no {reference} row")
            want = list(base["output_token_ids"])
            top1 = list(row["top1_token_ids"])
            row["agreement"] = sum(a == b for a, b in zip(top1, want)) / max(len(want), 1)
            row["nll"] = -mean(row["token_logprobs"]) if row["token_logprobs"] else 0.0
            row["delta_nll"] = row["nll"] - (-mean(base["token_logprobs"])
                                             if base["token_logprobs"] else 0.0)


def _check(name: str, ratio: Any, rows: Rows) -> str:
    if ratio is None:
        return "reference" if name == "no_cache" else ""
    if not all(r["blended"] for r in rows):
        return f"NOT blended: {sum(not r['blended'] for r in rows)} requests"
    if float(ratio) == 1.0:
        same = all(r["agreement"] == 1.0 for r in rows)
        return "identical to full prefill" if same else "NOT identical to full prefill"
    if float(ratio) == 0.0:
        pure = all(r["recomputed_tokens"] == r["prompt_tokens"] - r["reused_tokens"]
                   for r in rows)
        return "pure reuse" if pure else "NOT pure reuse"
    return ""


def summarize(by_pass: dict[str, list[dict[str, Any]]],
              reference: str = "no_cache") -> list[dict[str, Any]]:
    """One dict per pass (keys :data:`PASS_COLUMNS`), in the order of ``by_pass``.

    TTFT: mean, median and quartiles (ms) over all requests and repeats; ``speedup``: median
    (and quartiles) of the paired ratios TTFT(no cache) / TTFT(pass) of the same request and
    repeat, measured back to back. ``check``: ratio 1.0 → whether every output is identical
    to the no-cache one; ratio 0 → whether exactly the uncached tokens were recomputed (pure
    reuse); every CacheBlend pass → whether every request was blended.
    """
    ref = {_key(r): r for r in by_pass.get(reference, ())}
    out = []
    for name, rows in by_pass.items():
        if not rows:
            continue
        ttft = [1e3 * r["ttft_s"] for r in rows]
        p25, p50, p75 = quartiles(ttft)
        ratios = [ref[_key(r)]["ttft_s"] / r["ttft_s"] for r in rows
                  if _key(r) in ref and r["ttft_s"] > 0]
        s25, s50, s75 = quartiles(ratios) if ratios else (None,) * 3
        ratio = rows[0].get("ratio")
        agreement = [r["agreement"] for r in rows]
        out.append({
            "pass": name, "ratio": ratio, "requests": len(rows),
            "prompt_tokens_mean": mean(r["prompt_tokens"] for r in rows),
            "ttft_mean_ms": mean(ttft), "ttft_median_ms": p50, "ttft_p25_ms": p25,
            "ttft_p75_ms": p75, "speedup_vs_no_cache": s50, "speedup_p25": s25,
            "speedup_p75": s75,
            **{f"{c}_mean": mean(r[c] for r in rows)
               for c in ("hit_tokens", "reused_tokens", "recomputed_tokens")},
            "agreement_mean": mean(agreement), "agreement_min": min(agreement),
            "identical_outputs": sum(a == 1.0 for a in agreement),
            "nll_mean": mean(r["nll"] for r in rows),
            "delta_nll_mean": mean(r["delta_nll"] for r in rows),
            "check": _check(name, ratio, rows)})
    return out


def request_rows(by_pass: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every request row, flattened to :data:`REQUEST_COLUMNS`."""
    return [{c: r.get(c) for c in REQUEST_COLUMNS} for rows in by_pass.values() for r in rows]


def render_table(summary: Rows, title: str = "RAG blend: TTFT and quality per pass"):
    """A ``rich.table.Table`` of the summary (fits 100 columns)."""
    from rich.table import Table

    table = Table(title=title, caption="TTFT: median (p25-p75) ms over requests x repeats; "
                  "speedup: median of paired no-cache/pass ratios; agree: teacher-forced greedy "
                  "agreement with the no-cache output; dNLL: nats/token vs no cache")
    for col in ("pass", "n", "TTFT ms", "p25-p75", "speedup", "reused", "recomp",
                "agree", "same", "dNLL", "check"):
        table.add_column(col, justify="left" if col in ("pass", "check") else "right",
                         no_wrap=True)
    for s in summary:
        sp = "—" if s["speedup_vs_no_cache"] is None else f"{s['speedup_vs_no_cache']:.2f}x"
        table.add_row(
            s["pass"], str(s["requests"]), f"{s['ttft_median_ms']:.1f}",
            f"{s['ttft_p25_ms']:.1f}-{s['ttft_p75_ms']:.1f}", sp,
            f"{s['reused_tokens_mean']:.0f}", f"{s['recomputed_tokens_mean']:.0f}",
            f"{s['agreement_mean']:.3f}", f"{s['identical_outputs']}/{s['requests']}",
            f"{s['delta_nll_mean']:+.4f}", s["check"])
    return table


def plot(summary: Rows, path: str | Path, title: str = "RAG blend") -> Path:
    """TTFT (median, p25-p75 bars) against quality (left: agreement, right: ΔNLL) per pass,
    the CacheBlend ratios joined by a line; written as PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    blend = [s for s in summary if s["ratio"] is not None]
    for ax, col, label in ((axes[0], "agreement_mean", "greedy agreement with no cache"),
                           (axes[1], "delta_nll_mean", "ΔNLL vs no cache (nats/token)")):
        if blend:
            ax.plot([s["ttft_median_ms"] for s in blend], [s[col] for s in blend], "-",
                    color="tab:blue", alpha=0.5)
        for s in summary:
            color = ("tab:blue" if s["ratio"] is not None
                     else "black" if s["pass"] == "no_cache" else "tab:orange")
            x = s["ttft_median_ms"]
            ax.errorbar([x], [s[col]], xerr=[[x - s["ttft_p25_ms"]], [s["ttft_p75_ms"] - x]],
                        fmt="o", color=color, capsize=3)
            name = f"r={s['ratio']:g}" if s["ratio"] is not None else s["pass"]
            # reference passes below their point, ratios above: labels at equal quality
            # (no cache, prefix-only, ratio 1.0) do not overlap
            dy = {"no_cache": -12, "prefix_only": -22}.get(s["pass"], 5)
            ax.annotate(name, (x, s[col]), textcoords="offset points", xytext=(4, dy),
                        fontsize=8, color=color)
        ax.set_xlabel("TTFT, median ms (bars: p25-p75)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
