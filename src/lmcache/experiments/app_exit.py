"""One exit status per outcome for lmcache's Hydra experiment apps (long_doc_qa, multi_round_qa).

=====  ==================================================================================
0      success
2      configuration error (a bad value or unknown key; Hydra's own override errors too)
3      greedy outputs differ between passes (long_doc_qa)
4      a run failed (an engine crashed, ...)
130    interrupted
=====  ==================================================================================

A multirun exits with the highest status of its jobs.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

from lmcache.experiments.lmcache_config import ExperimentConfigError

EXIT_OK, EXIT_CONFIG, EXIT_MISMATCH, EXIT_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 4, 130


def job_status(app: str, log: logging.Logger, body: Callable[[], int]) -> int:
    """Run one job's ``body`` and turn what it raised into an exit status: configuration errors
    (:class:`ExperimentConfigError`, ValueError) → :data:`EXIT_CONFIG`, Ctrl-C →
    :data:`EXIT_INTERRUPTED`, anything else → :data:`EXIT_FAILED` (logged with its traceback).
    The message goes to the log and, prefixed with ``app``, to stderr."""
    try:
        return body()
    except (ExperimentConfigError, ValueError) as exc:
        log.error("configuration error: %s", exc)
        print(f"{app}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one exit status for a failed run
        log.exception("run failed")
        print(f"{app}: run failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


def exit_after(hydra_app: Callable[[], object], statuses: list[int]) -> None:
    """Run a ``@hydra.main`` app whose task function appends each job's status to ``statuses``
    and exit with the highest one. The task function never raises, so Hydra exits 1 only for
    its own config errors (unknown override, missing ``+``): that becomes :data:`EXIT_CONFIG`.

    Raises:
        SystemExit: always.
    """
    statuses.clear()
    try:
        hydra_app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (1 if exc.code else 0)
        sys.exit(EXIT_CONFIG if code == 1 else code)
    sys.exit(max(statuses, default=EXIT_OK))
