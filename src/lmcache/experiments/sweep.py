"""A Hydra multirun of an experiment ends in one table, one CSV and one plot (SweepReport).

Each job of ``python -m lmcache.experiments.long_doc_qa -m chunk_size=256,512 ...`` writes its
per-round CSV into its own folder ``<sweep dir>/<job number>/``, with one leading column per
swept key (the job's overrides). :class:`SweepReport` is a Hydra callback (registered in the
experiment YAML under ``hydra.callbacks``); at ``on_multirun_end`` it combines those files:

- ``<sweep dir>/sweep.csv``: every job's per-round rows, its overrides' columns first;
- ``<sweep dir>/sweep.png``: median paired speedup per round (error bars p25-p75) and median
  TTFT with lmcache, one line per job (matplotlib, Agg backend);
- the same rows as a table on stdout and in ``<sweep dir>/sweep.log``.

The table and the plot name only the keys whose value differs between jobs.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)
FIRST_ROUND_COLUMN = "round"


def read_job_csvs(sweep_dir: str | Path, csv_name: str) -> tuple[list[str], list[dict[str, str]]]:
    """(swept key columns, rows) of every ``<sweep_dir>/*/<csv_name>``, in job order.

    A row gets ``job`` (the job's folder name). Swept keys are the columns before ``round``,
    in first-seen order over the jobs.
    """
    keys: list[str] = []
    rows: list[dict[str, str]] = []
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if (p / csv_name).is_file()),
                  key=lambda p: (len(p.name), p.name))
    for job in jobs:
        with (job / csv_name).open() as f:
            reader = csv.DictReader(f)
            cols = list(reader.fieldnames or [])
            lead = cols[:cols.index(FIRST_ROUND_COLUMN)] if FIRST_ROUND_COLUMN in cols else []
            keys += [k for k in lead if k not in keys]
            rows += [{"job": job.name, **r} for r in reader]
    return keys, rows


def varying_keys(keys: list[str], rows: list[dict[str, str]]) -> list[str]:
    """The keys whose value differs between jobs (the table and the plot show only those; the
    CSV keeps every override)."""
    return [k for k in keys if len({r.get(k, "") for r in rows}) > 1]


def write_sweep_csv(keys: list[str], rows: list[dict[str, str]], path: Path) -> Path:
    """Write the combined rows: ``job``, the swept keys, then the experiment's columns."""
    rest: list[str] = []
    for r in rows:
        rest += [c for c in r if c not in rest and c not in keys and c != "job"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["job", *keys, *rest], restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _num(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def plot(keys: list[str], rows: list[dict[str, str]], path: Path) -> Path:
    """Two panels over the rounds, one line per job: speedup (median, p25-p75 bars) and median
    TTFT with lmcache in ms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    by_job: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_job.setdefault(r["job"], []).append(r)
    for job, rs in by_job.items():
        label = " ".join(f"{k}={rs[0].get(k, '')}" for k in keys) or f"job {job}"
        x = [int(r["round"]) for r in rs]
        sp = [_num(r.get("speedup")) for r in rs]
        if all(v is not None for v in sp):
            lo = [s - (_num(r.get("speedup_p25")) or s) for s, r in zip(sp, rs)]
            hi = [(_num(r.get("speedup_p75")) or s) - s for s, r in zip(sp, rs)]
            ax_s.errorbar(x, sp, yerr=[lo, hi], marker="o", capsize=3, label=label)
        tt = [_num(r.get("ttft_with_lmcache_s")) for r in rs]
        if all(v is not None for v in tt):
            ax_t.plot(x, [v * 1e3 for v in tt], marker="o", label=label)
    ax_s.axhline(1.0, color="grey", linewidth=0.8)
    ax_s.set(xlabel="round (1 = cold)", ylabel="speedup (TTFT without / with lmcache)",
             title="median paired speedup, p25-p75")
    ax_t.set(xlabel="round (1 = cold)", ylabel="ms", title="median TTFT with lmcache")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_s, ax_t):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render(keys: list[str], rows: list[dict[str, str]]):
    """A rich table: job, swept keys, round, median TTFTs (ms), speedup and spread, hits."""
    from rich.table import Table

    def ms(v):
        n = _num(v)
        return "—" if n is None else f"{n * 1e3:.1f}"

    def f2(v, suffix=""):
        n = _num(v)
        return "—" if n is None else f"{n:.2f}{suffix}"

    table = Table(title="sweep: TTFT per round and job",
                  caption="TTFT: median ms; speedup: median of paired ratios (p25-p75)")
    for name in ("job", *keys, "round", "w/o ms", "lmc ms", "speedup", "spread", "hits"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        spread = ("—" if _num(r.get("speedup_p25")) is None
                  else f"{f2(r['speedup_p25'])}-{f2(r['speedup_p75'])}")
        hits = _num(r.get("hit_tokens_with_lmcache"))
        table.add_row(r["job"], *(r.get(k, "") for k in keys), f"{r['round']} {r.get('phase', '')}",
                      ms(r.get("ttft_without_lmcache_s")), ms(r.get("ttft_with_lmcache_s")),
                      f2(r.get("speedup"), "x"), spread, "—" if hits is None else f"{hits:.0f}")
    return table


class SweepReport(Callback):
    """Hydra callback: combine a multirun's per-job CSVs (module docstring).

    Args:
        csv_name: the per-round CSV each job writes (the experiment's ``output.csv``).
        out_csv / out_plot / out_log: file names in the sweep folder.
    """

    def __init__(self, csv_name: str = "long_doc_qa.csv", out_csv: str = "sweep.csv",
                 out_plot: str = "sweep.png", out_log: str = "sweep.log") -> None:
        self.csv_name, self.out_csv, self.out_plot, self.out_log = csv_name, out_csv, out_plot, out_log

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from rich.console import Console

        sweep_dir = Path(str(config.hydra.sweep.dir))
        keys, rows = read_job_csvs(sweep_dir, self.csv_name)
        out = Console(soft_wrap=True, highlight=False)
        if not rows:
            out.print(f"sweep: no job wrote {self.csv_name} under {sweep_dir}", markup=False)
            return
        csv_path = write_sweep_csv(keys, rows, sweep_dir / self.out_csv)
        swept = varying_keys(keys, rows)
        png_path = plot(swept, rows, sweep_dir / self.out_plot)
        text = Console(record=True, width=120, file=io.StringIO())
        text.print(render(swept, rows))
        out.print(render(swept, rows))
        lines = [f"sweep CSV: {csv_path}", f"sweep plot: {png_path}"]
        for line in lines:
            out.print(line, markup=False)
        (sweep_dir / self.out_log).write_text(text.export_text() + "\n".join(lines) + "\n")
