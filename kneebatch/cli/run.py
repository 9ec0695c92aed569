"""The ``run`` command: a whole manifest on dask, with signals handled and a summary printed."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from kneebatch.cli.options import (
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_SIGNAL,
    EXIT_USAGE,
    REPORT,
    add_config_options,
    add_labels,
    add_plain_forward,
    add_read_timeout,
    add_slurm_options,
    cluster_spec_from_args,
    config_from_args,
    forward_from_args,
    model_file,
    positive_seconds,
)
from kneebatch.config import PAIRS, SUBJECT_TIMEOUT_S

log = logging.getLogger("kneebatch")


def _dry_run(args: argparse.Namespace, options: Any, model_path: Path) -> int:
    from kneebatch.cohort.plan import plan_run
    from kneebatch.cohort.progress import duration
    from kneebatch.extract.memory import gib

    plan = plan_run(args.manifest, args.out, model_path, options, cluster_spec_from_args(args))
    shown = 20

    def listing(ids: list[str]) -> str:
        return ", ".join(ids[:shown]) + (f", ... ({len(ids) - shown} more)" if len(ids) > shown
                                         else "")

    print("Dry run: nothing computed or written; no model loaded, no cluster started.")
    if plan.refused:
        print(f"The run would stop before any compute: {plan.refused}.")
        return EXIT_USAGE
    print(f"compute {len(plan.compute)}: {listing(plan.compute)}" if plan.compute
          else "compute 0")
    for subject, why in plan.redo:
        print(f"redo    {subject}: {why}")
    print(f"skip    {len(plan.skip)} already finished with these inputs and settings")
    for row in plan.unusable:
        print(f"unusable manifest row {row.line} ({row.subject_id or 'no id'}): {row.message}")
    for subject, message in plan.header_problems:
        print(f"would fail {subject}: {message}")
    todo = len(plan.compute) + len(plan.redo)
    if plan.workers:
        print(f"Layout: {plan.workers} worker(s) x {plan.threads} thread(s), "
              f"{gib(plan.memory_bytes)} each.")
    else:
        print("Layout: a joined cluster's workers (the estimate assumes one at a time).")
    if todo:
        over = " - over the worker's limit: it would fail at stage memory" if (
            plan.memory_bytes and plan.peak_bytes > plan.memory_bytes) else ""
        print(f"Estimate: {duration(plan.wall_s)} wall for {todo} knee(s): {plan.knee_s:.1f} s "
              f"per knee per worker (from {plan.basis}) plus {plan.startup_s:.0f} s to start; "
              f"peak memory per worker about {gib(plan.peak_bytes)} (largest: "
              f"{plan.peak_subject}){over}.")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from kneebatch.cohort.progress import Progress
    from kneebatch.cohort.run import RunOptions, run_cohort
    from kneebatch.inputs.extras import parse_column_types

    config = config_from_args(args)
    model_path = model_file(args)
    if args.dry_run:
        return _dry_run(args, RunOptions(
            config=config, labels=args.labels, overwrite=args.overwrite, part=args.shard,
            read_timeout_s=args.read_timeout), model_path)
    progress = Progress(0, sys.stderr.write, tty=sys.stderr.isatty() and not args.quiet,
                        every_n=args.progress_every)
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now
        log.warning("received %s: finishing the run; finished subjects are kept (Ctrl-C again "
                    "to abort at once)", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, request_stop)
    _route_dask_logging(args.debug)
    options = RunOptions(config=config, labels=args.labels, overwrite=args.overwrite,
                         part=args.shard, qc=args.qc, gather_results=not args.no_gather,
                         read_timeout_s=args.read_timeout,
                         subject_timeout_s=args.subject_timeout, forward=forward_from_args(args),
                         column_types=parse_column_types(args.column_types))
    summary = run_cohort(args.manifest, args.out, model_path, options,
                         cluster=cluster_spec_from_args(args), on_start=progress.start,
                         on_progress=progress, stop=stop)
    print(f"Run {summary.run_id}: {summary.ok} finished, {summary.failed} failed, "
          f"{summary.skipped} skipped (already done) of {summary.total} in "
          f"{summary.wall_s:.0f} s ({summary.knees_per_hour:.0f} knees/h).")
    if summary.covariates_updated:
        print(f"{summary.ok} knee(s) computed; covariates updated for "
              f"{summary.covariates_updated} (the manifest's extra columns are joined at "
              "gather: editing them recomputes nothing).")
    if summary.changed:
        print(f"{summary.changed} subject(s) were redone because their inputs, settings or "
              "result files changed since they were finished.")
    if summary.left_out:
        print(f"{summary.left_out} folder(s) under {summary.out / 'subjects'} are not in this "
              "manifest and were left out of the Parquet.")
    if args.no_gather:
        print(f"Per-subject results in {summary.out / 'subjects'}; build the Parquet with "
              f"`kneebatch gather {summary.out}` once every shard is done.")
    else:
        print(f"Results in {summary.out}: similarities/, features/ and regions/ (Parquet), run.json, "
              "failures.csv, subjects/")
        _print_summary_table(summary.out)
    if summary.failed:
        print(f"{summary.failed} subject(s) failed: see {summary.out / 'failures.csv'}")
    if summary.pending and not summary.stopped:
        print(f"{summary.pending} subject(s) of the manifest have no current result (replaced "
              f"by another run?): see `kneebatch status {summary.out}`, then rerun.")
        return EXIT_FAILED
    if summary.stopped:
        print("Stopped before the end; finished subjects are kept. To resume, run the same "
              "command again.")
        return EXIT_SIGNAL
    if summary.internal:
        print(f"{summary.internal} subject(s) failed with an unexpected error (see failures.csv "
              f"and the log). {REPORT}.")
        return EXIT_INTERNAL
    return EXIT_FAILED if summary.failed else EXIT_OK


def _print_summary_table(out: Path) -> None:
    import pandas as pd

    sims = pd.read_parquet(out / "similarities")
    if sims.empty:
        return
    sims["pair"] = sims["region_a"] + "-" + sims["region_b"]
    table = sims.pivot_table(index="layer", columns="pair", values="cosine", aggfunc="mean")
    table = table[[f"{a}-{b}" for a, b in PAIRS]]
    weights = ", ".join(sorted(sims["weights"].unique()))
    print(f"Mean cosine similarity over {sims['subject_id'].nunique()} subject(s) "
          f"(from {out / 'similarities'}; weights: {weights}):")
    print(table.round(4).to_string())


def _route_dask_logging(debug: bool) -> None:
    """dask's own log lines in our format, and quiet (errors only) unless ``--debug``; worker
    processes inherit the level through dask's config variable."""
    import distributed  # noqa: F401  (dask sets up its loggers on import; we replace them)

    level = "info" if debug else "error"
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", level)
    for name in ("distributed", "dask_jobqueue"):
        logger = logging.getLogger(name)
        logger.handlers[:] = logging.getLogger("kneebatch").handlers
        logger.setLevel(logging.INFO if debug else logging.ERROR)
        logger.propagate = False


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``run`` command(s) to the parser."""
    p = sub.add_parser("run", help="a whole manifest on dask, gathered into Parquet")
    p.add_argument("manifest", type=Path, help="cohort CSV: subject_id,ct,mask[,side,...]")
    p.add_argument("--out", type=Path, required=True,
                   help="the output folder (a rerun with the same OUT resumes)")
    p.add_argument("--model", default=None, help="model file (default: $KNEEBATCH_MODEL)")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes (default: usable CPUs / 2, from SLURM_CPUS_PER_TASK or "
                        "the CPU affinity)")
    p.add_argument("--threads-per-worker", type=int, default=0,
                   help="compute threads per worker (default: CPUs / workers; on a joined "
                        "scheduler: 1 per task slot)")
    p.add_argument("--subjects-per-worker", type=int, default=2, metavar="N",
                   help="subjects a local worker holds at once (default: 2: it reads the next "
                        "while the current one runs through the network; 1: one after the other, "
                        "less memory)")
    p.add_argument("--memory-per-worker", default=None, metavar="SIZE",
                   help="memory limit of each local worker, e.g. 4GB (default: the job's memory "
                        "/ workers); subjects predicted to need more are refused")
    p.add_argument("--cluster", choices=["local", "slurm"], default="local",
                   help="local: a LocalCluster here (default); slurm: worker jobs via dask-jobqueue")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler-file", default=None, help="join this dask scheduler")
    where.add_argument("--scheduler-address", default=None, help="join this dask scheduler")
    p.add_argument("--wait-workers", type=int, default=1, metavar="N",
                   help="with --scheduler-file/-address: wait up to 2 minutes for N workers and "
                        "check their memory before the first subject (default 1; the job "
                        "scripts pass their task count)")
    p.add_argument("--dry-run", action="store_true",
                   help="say what the run would compute, skip and redo (and why), with an "
                        "estimate of its wall time and memory per worker; nothing is computed, "
                        "written or started")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="settings from a TOML file ([extraction] and [run] tables) or a finished "
                        "run's run.json; options given here win (`kneebatch config OUT` writes one)")
    p.add_argument("--tls-dir", type=Path, default=None, metavar="DIR",
                   help="with --scheduler-file/-address: connect with the TLS credentials of "
                        "`kneebatch tls-credentials DIR` (default: dask's own "
                        "distributed.comm.tls.* configuration, if any)")
    p.add_argument("--shard", default=None, metavar="I/N", help="only subjects I, I+N, ... (0-based)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute finished subjects too; replace results of other settings or "
                        "another model in OUT (otherwise refused)")
    p.add_argument("--qc", action="store_true",
                   help="write each subject's qc.png as it finishes (see `kneebatch report`)")
    p.add_argument("--no-gather", action="store_true",
                   help="skip the Parquet at the end (array shards: one `kneebatch gather` after)")
    p.add_argument("--progress-every", type=int, default=0, metavar="N",
                   help="in batch logs, a progress line every N subjects (default: 5%%)")
    p.add_argument("--dashboard", action="store_true",
                   help="serve dask's dashboard on localhost (a free port; the link is logged)")
    p.add_argument("--column-types", default=None, metavar="COLUMN=TYPE,...",
                   help="types of the manifest's extra columns in the Parquet, e.g. "
                        "mrn=string,age=float64 (int64, float64, bool, string); undeclared "
                        "columns are inferred, values with leading zeros stay text")
    add_read_timeout(p)
    p.add_argument("--subject-timeout", type=positive_seconds, default=SUBJECT_TIMEOUT_S,
                   metavar="S", help="a subject still computing after S seconds fails at stage "
                   "timeout, checked between its stages (default: %(default)g; a clinical knee "
                   "takes seconds to a minute)")
    add_plain_forward(p)
    add_labels(p)
    add_config_options(p)
    add_slurm_options(p)
    p.set_defaults(func=_cmd_run)
