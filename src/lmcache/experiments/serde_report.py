"""The serde sweep's combined report: one table, one CSV and one plot (size vs quality).

Each job of ``python -m lmcache.experiments.serde_sweep -m remote_serde=naive,cachegen,...``
writes one row into ``<sweep dir>/<job number>/serde_sweep.csv``
(:data:`lmcache.experiments.serde_sweep.COLUMNS`). :class:`SerdeSweepReport` is a Hydra
callback (registered in ``conf/experiment/serde_sweep.yaml``); at ``on_multirun_end`` it writes

- ``<sweep dir>/sweep.csv``: every job's row, in job order;
- ``<sweep dir>/sweep.png``: x = times smaller than bf16; left: greedy agreement and
  teacher-forced top-1 (%), right: NLL of the naive output (nats/token); one labelled point
  per job (matplotlib, Agg backend);
- the rows as a table on stdout and in ``<sweep dir>/sweep.log``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


def read_rows(sweep_dir: str | Path, csv_name: str) -> list[dict[str, str]]:
    """Rows of every ``<sweep_dir>/*/<csv_name>`` in job order, each with ``job`` (its
    folder name) first."""
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if (p / csv_name).is_file()),
                  key=lambda p: (len(p.name), p.name))
    rows = []
    for job in jobs:
        with (job / csv_name).open() as f:
            rows += [{"job": job.name, **r} for r in csv.DictReader(f)]
    return rows


def label(row: dict[str, str]) -> str:
    """The job's serde and, where given, its extra serde overrides."""
    extra = row.get("serde_overrides", "")
    return row.get("remote_serde", "?") + (f" {extra}" if extra else "")


def render(rows: list[dict[str, str]]):
    """A rich table of the rows."""
    from rich.table import Table

    table = Table(title="serde sweep: size vs quality on the trained tiny Llama's KV",
                  caption="agreement / top-1 / NLL: against the naive pass's greedy tokens; "
                          "TTFT: retrieve through the remote tier + first token (median ms)")
    cols = [("serde", label), ("bytes/token", "bytes_per_token"),
            ("x smaller", lambda r: f"{float(r['x_smaller_than_bf16']):.2f}x"),
            ("greedy agree", lambda r: f"{float(r['greedy_agreement_pct']):.1f} %"),
            ("top-1 (t.f.)", lambda r: f"{float(r['teacher_forced_top1_pct']):.1f} %"),
            ("NLL naive out", "nll_naive_output"), ("TTFT ms", "ttft_ms"),
            ("prefill ms", "ttft_prefill_ms"), ("max rel err", "max_rel_error")]
    for name, _ in cols:
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(*((get(r) if callable(get) else str(r.get(get, ""))) for _, get in cols))
    return table


def plot(rows: list[dict[str, str]], path: Path) -> Path:
    """Size vs quality, one labelled point per row (module doc)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        x = float(r["x_smaller_than_bf16"])
        a.scatter(x, float(r["greedy_agreement_pct"]), marker="o", color="tab:blue")
        a.scatter(x, float(r["teacher_forced_top1_pct"]), marker="^", color="tab:orange")
        a.annotate(label(r), (x, float(r["greedy_agreement_pct"])), fontsize=8)
        b.scatter(x, float(r["nll_naive_output"]), color="tab:green")
        b.annotate(label(r), (x, float(r["nll_naive_output"])), fontsize=8)
    a.set(xlabel="times smaller than bf16", ylabel="% (o greedy agreement, ^ teacher-forced top-1)")
    b.set(xlabel="times smaller than bf16", ylabel="NLL of the naive output (nats/token)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle("serde sweep: size vs quality (trained tiny Llama, vs the naive pass)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def combine(sweep_dir: str | Path, csv_name: str = "serde_sweep.csv",
            out_csv: str = "sweep.csv", out_plot: str = "sweep.png",
            out_log: str = "sweep.log", echo: bool = True) -> list[dict[str, str]]:
    """Write the combined CSV, plot and log of a sweep folder (module doc); return the rows
    (empty when no job wrote ``csv_name``: nothing is written)."""
    from rich.console import Console

    sweep_dir = Path(sweep_dir)
    rows = read_rows(sweep_dir, csv_name)
    if not rows:
        if echo:
            print(f"serde sweep: no job wrote {csv_name} under {sweep_dir}")
        return rows
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with (sweep_dir / out_csv).open("w", newline="") as f:
        writer = csv.DictWriter(f, cols, restval="")
        writer.writeheader()
        writer.writerows(rows)
    png = plot(rows, sweep_dir / out_plot)
    text = Console(record=True, width=140, file=io.StringIO())
    text.print(render(rows))
    lines = [f"serde sweep CSV: {sweep_dir / out_csv}", f"serde sweep plot: {png}"]
    (sweep_dir / out_log).write_text(text.export_text() + "\n".join(lines) + "\n")
    if echo:
        out = Console(soft_wrap=True, highlight=False, width=140)
        out.print(render(rows))
        for line in lines:
            out.print(line, markup=False)
    return rows


class SerdeSweepReport(Callback):
    """Hydra callback: :func:`combine` the multirun's folder at its end.

    Args:
        csv_name: the CSV each job writes (the experiment's ``output.csv``).
    """

    def __init__(self, csv_name: str = "serde_sweep.csv") -> None:
        self.csv_name = csv_name

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        combine(str(config.hydra.sweep.dir), self.csv_name)
