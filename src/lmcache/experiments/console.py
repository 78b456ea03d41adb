"""What an experiment shows while it runs: one line per phase, tables, and the same in its log.

Every line and table goes to stdout (rich, never wrapped mid-path: ``soft_wrap``) and, as plain
text, to the ``lmcache.experiments`` logger at INFO, which Hydra's job logging writes to the
run's log file (``<output dir>/<job name>.log``). Lines flagged as errors go to stderr. Warnings
of other libraries stay out of the way: Python warnings are routed to the log file
(``logging.captureWarnings``, see the experiment YAML's ``hydra.job_logging``), and each engine
process writes its stdout/stderr into its own log file (:mod:`lmcache.experiments.runner`).
"""

from __future__ import annotations

import io
import logging
from statistics import median
from typing import Any

log = logging.getLogger("lmcache.experiments")


class Reporter:
    """Prints and logs an experiment's progress.

    Args:
        progress: print a line per (repeat, round) while measuring (:meth:`on_result`).
        width: console width for tables (rich default when None).
    """

    def __init__(self, progress: bool = True, width: int | None = None) -> None:
        from rich.console import Console

        logging.captureWarnings(True)
        self.out = Console(soft_wrap=True, width=width, highlight=False)
        self.err = Console(stderr=True, soft_wrap=True, width=width, highlight=False)
        self.progress = progress
        self._round: tuple[int, int] | None = None
        self._rows: dict[str, list[dict[str, Any]]] = {}

    def line(self, text: str, error: bool = False) -> None:
        """One line to stdout (stderr when ``error``) and to the log."""
        (self.err if error else self.out).print(text, markup=False)
        (log.error if error else log.info)(text)

    def table(self, table) -> None:
        """A rich table to stdout and, rendered as text, to the log."""
        from rich.console import Console

        self.out.print(table)
        plain = Console(record=True, width=100, file=io.StringIO())
        plain.print(table)
        log.info("\n%s", plain.export_text())

    def on_result(self, pass_name: str, row: dict[str, Any]) -> None:
        """Collect one measurement; print a line when a (repeat, round) is complete."""
        key = (int(row.get("repeat", 0)), int(row["round"]))
        if self._round is not None and key != self._round:
            self.flush_round()
        self._round = key
        self._rows.setdefault(pass_name, []).append(row)

    def flush_round(self) -> None:
        """Print the line of the (repeat, round) collected so far, if any."""
        if self._round is None or not self._rows:
            return
        rep, rnd = self._round
        parts = []
        for name, rows in self._rows.items():
            ttft = median(r["ttft_s"] for r in rows) * 1e3
            hits = sum(int(r["hit_tokens"]) for r in rows)
            parts.append(f"{name} {ttft:.0f} ms ({hits} hit tokens)")
        n = len(next(iter(self._rows.values())))
        text = (f"repeat {rep + 1} round {rnd + 1} ({'cold' if rnd == 0 else 'warm'}), "
                f"{n} requests, median TTFT: " + ", ".join(parts))
        if self.progress:
            self.line(text)
        else:
            log.info(text)
        self._rows = {}
        self._round = None
