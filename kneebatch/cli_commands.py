"""The command line's commands: one function per subcommand, each taking the parsed arguments and
returning the exit code. Part of the command line layer (``cli`` parses, sets up logging and
dispatches here); like ``cli``, these print."""

from __future__ import annotations

import argparse
import collections
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kneebatch import __version__
from kneebatch.cli_options import (
    cluster_spec_from_args,
    config_from_args,
    forward_from_args,
    slurm_options_from_args,
)
from kneebatch.config import PAIRS
from kneebatch.errors import ConfigError, KneebatchError

if TYPE_CHECKING:
    from kneebatch.similarity import SimilarityRow

log = logging.getLogger("kneebatch")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SIGNAL = 0, 1, 2, 75


def _model_path(args: argparse.Namespace) -> Path:
    value = args.model or os.environ.get("KNEEBATCH_MODEL")
    if not value:
        raise ConfigError("No model file given. Build one with `kneebatch build-model --out "
                          "model3d_state_dict.pth`, then pass --model FILE or set "
                          "KNEEBATCH_MODEL=FILE.")
    return Path(value)


def cmd_sample(args: argparse.Namespace) -> int:
    from kneebatch.phantom import write_sample

    folder = args.out_dir or args.dir
    if folder is None:
        raise ConfigError("sample needs a folder: kneebatch sample DIR (or --out DIR)")
    manifest = write_sample(folder, args.subjects, size=args.size, seed=args.seed)
    print(f"Wrote {args.subjects} {args.size} phantom knee(s) and {manifest}")
    return EXIT_OK


def cmd_build_model(args: argparse.Namespace) -> int:
    from kneebatch.network.model import build_model, save_model

    network, source = build_model(weights=args.weights, seed=args.seed)
    info = save_model(network, source, args.out)
    print(f"Wrote {args.out} (weights {info.weights}, sha256 {info.sha256[:16]}...)")
    return EXIT_OK


def _print_table(subject_id: str, rows: Sequence[SimilarityRow], weights: str) -> None:
    cos = {(r.layer, r.region_a, r.region_b): r.cosine for r in rows}
    layers = list(dict.fromkeys(r.layer for r in rows))
    print(f"Cosine similarities for {subject_id} (weights: {weights})")
    print(f"{'layer':<12} " + " ".join(f"{a + '-' + b:>18}" for a, b in PAIRS))
    for layer in layers:
        print(f"{layer:<12} " + " ".join(f"{cos[(layer, a, b)]:>18.6f}" for a, b in PAIRS))


def cmd_extract(args: argparse.Namespace) -> int:
    import uuid
    from datetime import datetime, timezone

    from kneebatch.manifest import knees, subject_spec
    from kneebatch.network.model import get_model
    from kneebatch.network.options import compute_dtype
    from kneebatch.outdir import check_settings, claim_out
    from kneebatch.records import SettingsRecord
    from kneebatch.runtime import configure_compute, usable_cpus
    from kneebatch.store import read_similarities, subject_dir
    from kneebatch.subject import process_subject

    config = config_from_args(args)
    specs = knees(subject_spec(args.subject_id, args.ct, args.mask, args.side, args.labels))
    configure_compute(args.threads or usable_cpus())
    compute_dtype(config.precision)
    model_path = _model_path(args)
    # A bad model file is a usage error (exit 2), not a subject's.
    model = get_model(model_path, config.input_norm, config.conv_padding)
    claim_out(args.out)
    check_settings(args.out, SettingsRecord(config.hash(), model.info.sha256, model.info.weights,
                                            config.to_dict()), overwrite=args.overwrite)
    run_id = f"extract-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    code = EXIT_OK
    for spec in specs:  # one knee, or both legs of a bilateral scan
        outcome = process_subject(spec, config, model_path, args.out, run_id=run_id,
                                  overwrite=args.overwrite, options=forward_from_args(args))
        if outcome.status == "claimed":
            print(f"kneebatch: subject {spec.subject_id} is being computed by another process "
                  "right now; try again when it has finished.", file=sys.stderr)
            code = EXIT_FAILED
        elif outcome.status == "failed":
            print(f"kneebatch: subject {spec.subject_id} failed at {outcome.stage}: "
                  f"{outcome.error}", file=sys.stderr)
            code = EXIT_FAILED
        else:
            folder = subject_dir(args.out, spec.subject_id)
            _print_table(spec.subject_id, read_similarities(folder), model.info.weights)
            print(f"Results in {folder}")
    return code


def cmd_validate(args: argparse.Namespace) -> int:
    from kneebatch.io import check_headers
    from kneebatch.manifest import parse_manifest
    from kneebatch.memory import estimate_bytes, gib
    from kneebatch.preflight import MaskCheck, check_mask

    config = config_from_args(args)
    specs, row_problems = parse_manifest(args.manifest, args.labels)
    for row in row_problems:
        print(f"FAIL {row.subject_id or '(no id)'}: manifest {row.message}")
    problems = len(row_problems)
    headers = {}
    for spec in specs:  # first pass: headers only, fast
        try:
            headers[spec.subject_id] = check_headers(spec, config, args.read_timeout)
        except KneebatchError as exc:
            problems += 1
            print(f"FAIL {spec.subject_id}: {exc.message}")
    for spec in specs:  # second pass: the masks' label values
        if spec.subject_id not in headers:
            continue
        header, mask = headers[spec.subject_id]
        notes: tuple[str, ...] = ()
        if not args.headers_only:
            try:
                check = check_mask(spec, args.read_timeout)
            except KneebatchError as exc:
                check = MaskCheck((exc.message,), ())
            if check.problems:
                problems += 1
                print(f"FAIL {spec.subject_id}: " + "; ".join(check.problems))
                continue
            notes = check.notes
        need = estimate_bytes(header.size, header.spacing, config, mask.size)
        print(f"ok   {spec.subject_id}: {header.size[0]}x{header.size[1]}x{header.size[2]} "
              f"{header.pixel}, spacing {tuple(round(s, 3) for s in header.spacing)} mm, "
              f"needs about {gib(need)} per worker" + "".join(f"; note: {n}" for n in notes))
    rows = len(specs) + len(row_problems)
    print(f"{rows - problems} of {rows} subject(s) look fine; {problems} problem(s).")
    return EXIT_FAILED if problems else EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    import platform
    import socket

    import SimpleITK
    import torch
    import torchvision

    from kneebatch.network.model import check_model_file
    from kneebatch.runtime import usable_cpus

    job = os.environ.get("SLURM_JOB_ID")
    print(f"kneebatch {__version__} on {socket.gethostname()}"
          + (f" (SLURM job {job})" if job else "") + f", {usable_cpus()} usable CPU(s); python "
          f"{platform.python_version()} ({sys.executable}), torch {torch.__version__} (CUDA "
          f"{'available' if torch.cuda.is_available() else 'not available'}), torchvision "
          f"{torchvision.__version__}, SimpleITK {SimpleITK.Version.VersionString()}")
    value = args.model or os.environ.get("KNEEBATCH_MODEL")
    if value:
        info = check_model_file(Path(value))  # a bad model file fails the job here, at once
        print(f"model {value}: sha256 {info.sha256}, weights {info.weights}")
    return EXIT_OK


def cmd_job_script(args: argparse.Namespace) -> int:
    from kneebatch.cluster import slurm_cluster

    with slurm_cluster(slurm_options_from_args(args), args.threads_per_worker or 2) as cluster:
        print(cluster.job_script())
    return EXIT_OK


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


def cmd_run(args: argparse.Namespace) -> int:
    from kneebatch.progress import Progress
    from kneebatch.run import run_cohort

    config = config_from_args(args)
    model_path = _model_path(args)
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
    summary = run_cohort(args.manifest, args.out, model_path, config=config,
                         cluster=cluster_spec_from_args(args), overwrite=args.overwrite,
                         on_progress=progress, stop=stop, gather_results=not args.no_gather,
                         qc=args.qc, part=args.shard,
                         read_timeout_s=args.read_timeout, on_start=progress.start,
                         forward=forward_from_args(args), labels=args.labels)
    print(f"Run {summary.run_id}: {summary.ok} finished, {summary.failed} failed, "
          f"{summary.skipped} skipped (already done) of {summary.total} in "
          f"{summary.wall_s:.0f} s ({summary.knees_per_hour:.0f} knees/h).")
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
    return EXIT_FAILED if summary.failed else EXIT_OK


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


def cmd_gather(args: argparse.Namespace) -> int:
    from kneebatch.gather import gather_run

    result = gather_run(args.out)
    print(f"Gathered {result.subjects} subject(s) ({result.similarity_rows} similarity rows, "
          f"{result.feature_rows} feature rows) into {args.out}; {result.failures} failure(s) "
          "in failures.csv")
    if result.left_out:
        print(f"Left out {result.left_out} folder(s) under {args.out / 'subjects'} that are not "
              "in the last run's manifest.")
    if result.pending:
        print(f"{len(result.pending)} subject(s) of the manifest have no current result yet "
              f"(e.g. {', '.join(result.pending[:3])}); rerun `kneebatch run` to compute them.")
    return EXIT_FAILED if result.pending else EXIT_OK


def cmd_merge(args: argparse.Namespace) -> int:
    from kneebatch.merge import merge_runs

    result = merge_runs(args.runs, args.out)
    print(f"Merged {len(result.sources)} run folder(s) into {args.out}: {result.subjects} "
          f"subject(s) in similarities/, features/ and regions/; {result.failures} failure(s) "
          "in failures.csv")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from kneebatch.outdir import check_owned
    from kneebatch.tables import export_wide

    check_owned(args.out)
    matrix = export_wide(args.out, args.wide, args.layer, args.region)
    print(f"Wrote {args.wide}: {matrix.shape[0]} subject(s) x {matrix.shape[1]} feature(s)")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from kneebatch.progress import duration
    from kneebatch.status import cohort_status

    status = cohort_status(args.out, args.manifest)
    total = len(status.finished) + len(status.failed) + len(status.running) + len(status.pending)
    print(f"{args.out}: {total} subject(s) in the manifest")
    print(f"  finished {len(status.finished):>6}")
    stages = ", ".join(f"{stage} {n}" for stage, n in status.failures_by_stage().items())
    print(f"  failed   {len(status.failed):>6}" + (f"   by stage: {stages}" if stages else ""))
    where = collections.Counter(f"{h.host} (pid {h.pid}{', job ' + h.job_id if h.job_id else ''})"
                                for h in status.running.values())
    print(f"  running  {len(status.running):>6}"
          + (f"   on {', '.join(f'{w}: {n}' for w, n in where.items())}" if where else ""))
    print(f"  pending  {len(status.pending):>6}")
    run = status.run
    if run is not None:
        state = "running" if not run.ended else ("stopped" if run.stopped else "ended")
        rate = (f"{status.rate_per_h:.0f} knees/h" if status.rate_per_h else "no subject yet")
        eta = status.eta_s
        print(f"latest run {run.run_id} ({state}, started {run.started}): {rate}"
              + (f", ETA {duration(eta)}" if eta and (status.running or status.pending) else ""))
    if status.failed:
        print(f"failures: {args.out / 'failures.csv'}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from kneebatch.cohort_report import write_cohort_report
    from kneebatch.outdir import check_owned

    check_owned(args.out)
    if not args.no_qc:
        from kneebatch.qc import write_missing_qc

        written, failed = write_missing_qc(args.out, redo=args.redo_qc)
        print(f"QC pictures in {args.out / 'subjects'}: {written} drawn now, the others were "
              "there already (--redo-qc redraws them)"
              + (f"; {failed} could not be made (see the log)" if failed else ""))
    index = write_cohort_report(args.out, by=args.by)
    print(f"Cohort report: {index}")
    return EXIT_OK
