"""Command line: a thin layer over the package. The only module that sets up logging and prints."""


from __future__ import annotations

import argparse
import collections
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kneebatch import __version__
from kneebatch.cli.options import (
    add_config_options,
    add_labels,
    add_plain_forward,
    add_read_timeout,
    add_slurm_options,
    cluster_spec_from_args,
    config_from_args,
    forward_from_args,
    slurm_options_from_args,
)
from kneebatch.config import PAIRS
from kneebatch.errors import ConfigError, KneebatchError

if TYPE_CHECKING:
    from kneebatch.extract.similarity import SimilarityRow

log = logging.getLogger("kneebatch")

DESCRIPTION = """\
kneebatch: deep features of knee CT cohorts. For each knee (CT + label mask) it splits the CT into
tibia, femur and background, runs each through ImageNet DenseNet121 inflated to 3D, pools
denseblock2/3/4 to vectors and writes their cosine similarities; whole cohorts fan out over dask
(locally or on SLURM) into Parquet datasets you read with pandas.

typical use:
  kneebatch build-model --out model.pth           once, where the internet is
  kneebatch validate cohort.csv                   check files, headers and labels first
  kneebatch run cohort.csv --out results --model model.pth
  kneebatch report results                        QC pictures and cohort figures
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SIGNAL = 0, 1, 2, 75


def _model_path(args: argparse.Namespace) -> Path:
    value = args.model or os.environ.get("KNEEBATCH_MODEL")
    if not value:
        raise ConfigError("No model file given. Build one with `kneebatch build-model --out "
                          "model3d_state_dict.pth`, then pass --model FILE or set "
                          "KNEEBATCH_MODEL=FILE.")
    return Path(value)


def _cmd_sample(args: argparse.Namespace) -> int:
    from kneebatch.inputs.phantom import write_sample

    folder = args.out_dir or args.dir
    if folder is None:
        raise ConfigError("sample needs a folder: kneebatch sample DIR (or --out DIR)")
    manifest = write_sample(folder, args.subjects, size=args.size, seed=args.seed)
    print(f"Wrote {args.subjects} {args.size} phantom knee(s) and {manifest}")
    return EXIT_OK


def _cmd_build_model(args: argparse.Namespace) -> int:
    from kneebatch.network.modelfile import save_model
    from kneebatch.network.weights import build_model

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


def _cmd_extract(args: argparse.Namespace) -> int:
    import uuid
    from datetime import datetime, timezone

    from kneebatch.cohort.task import process_subject
    from kneebatch.inputs.manifest import knees, subject_spec
    from kneebatch.network.cache import get_model
    from kneebatch.network.options import compute_dtype
    from kneebatch.outdir.folder import check_settings, claim_out
    from kneebatch.outdir.records import SettingsRecord
    from kneebatch.results.subject_files import read_similarities, subject_dir
    from kneebatch.runtime import configure_compute, usable_cpus

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


def _cmd_validate(args: argparse.Namespace) -> int:
    from kneebatch.extract.memory import estimate_bytes, gib
    from kneebatch.inputs.manifest import parse_manifest
    from kneebatch.scan.headers import check_headers
    from kneebatch.scan.preflight import MaskCheck, check_mask

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


def _cmd_info(args: argparse.Namespace) -> int:
    import platform
    import socket

    import SimpleITK
    import torch
    import torchvision

    from kneebatch.network.modelfile import check_model_file
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


def _cmd_job_script(args: argparse.Namespace) -> int:
    from kneebatch.cohort.cluster import slurm_cluster

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


def _cmd_run(args: argparse.Namespace) -> int:
    from kneebatch.cohort.progress import Progress
    from kneebatch.cohort.run import run_cohort

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


def _cmd_gather(args: argparse.Namespace) -> int:
    from kneebatch.results.gather import gather_run

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


def _cmd_merge(args: argparse.Namespace) -> int:
    from kneebatch.results.merge import merge_runs

    result = merge_runs(args.runs, args.out)
    print(f"Merged {len(result.sources)} run folder(s) into {args.out}: {result.subjects} "
          f"subject(s) in similarities/, features/ and regions/; {result.failures} failure(s) "
          "in failures.csv")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from kneebatch.outdir.folder import check_owned
    from kneebatch.results.tables import export_wide

    check_owned(args.out)
    matrix = export_wide(args.out, args.wide, args.layer, args.region)
    print(f"Wrote {args.wide}: {matrix.shape[0]} subject(s) x {matrix.shape[1]} feature(s)")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from kneebatch.cohort.progress import duration
    from kneebatch.cohort.status import cohort_status

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


def _cmd_report(args: argparse.Namespace) -> int:
    from kneebatch.outdir.folder import check_owned
    from kneebatch.report.figures import write_cohort_report

    check_owned(args.out)
    if not args.no_qc:
        from kneebatch.report.qc import write_missing_qc

        written, failed = write_missing_qc(args.out, redo=args.redo_qc)
        print(f"QC pictures in {args.out / 'subjects'}: {written} drawn now, the others were "
              "there already (--redo-qc redraws them)"
              + (f"; {failed} could not be made (see the log)" if failed else ""))
    index = write_cohort_report(args.out, by=args.by)
    print(f"Cohort report: {index}")
    return EXIT_OK


def _add_out_folder(parser: argparse.ArgumentParser) -> None:
    """OUT as the first argument or as ``--out``, the way ``run`` and ``extract`` spell it."""
    parser.add_argument("out", type=Path, nargs="?", default=None, metavar="OUT",
                        help="the output folder of a run (or give it as --out OUT)")
    parser.add_argument("--out", type=Path, dest="out_option", default=None, metavar="OUT",
                        help="the same as the OUT argument")


def _add_global_flags(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="debug logs and full tracebacks")
    parser.add_argument("--quiet", action="store_true", default=default,
                        help="warnings and errors only")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate from ``main`` so tests and docs can read it)."""
    parser = argparse.ArgumentParser(prog="kneebatch", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kneebatch {__version__}")
    _add_global_flags(parser, default=False)
    # The same flags after the subcommand (`kneebatch run ... --quiet`); not given there, they
    # keep the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_global_flags(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])  # type: ignore[method-assign]

    p = sub.add_parser("sample", help="write synthetic knee phantoms and a manifest.csv")
    p.add_argument("dir", type=Path, nargs="?", default=None,
                   help="folder for the phantoms and manifest.csv (or give it as --out DIR)")
    p.add_argument("--out", type=Path, dest="out_dir", default=None, metavar="DIR",
                   help="the same as the DIR argument")
    p.add_argument("--subjects", type=int, default=4, help="number of knees (default: 4)")
    p.add_argument("--size", choices=["clinical", "small"], default="clinical",
                   help="clinical: 512x512x~200 at 0.35x0.35x0.8 mm (default); small: for tests")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms (default: 0)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("build-model", help="inflate DenseNet121 to 3D and write the model file")
    p.add_argument("--weights", default="imagenet", metavar="imagenet|random|PATH",
                   help="imagenet (torchvision download/cache, default), random (seeded; tests and "
                        "offline demos only) or a torchvision densenet121 .pth")
    p.add_argument("--seed", type=int, default=0, help="seed of --weights random")
    p.add_argument("--out", type=Path, default=Path("model3d_state_dict.pth"),
                   help="the model file to write, with its sidecar .json beside it (default: "
                        "%(default)s)")
    p.set_defaults(func=_cmd_build_model)

    p = sub.add_parser("extract", help="one knee: features and similarities into OUT/subjects/ID")
    p.add_argument("--ct", type=Path, required=True, help="CT file or DICOM series folder")
    p.add_argument("--mask", type=Path, required=True, help="label mask (1 tibia, 2 femur)")
    p.add_argument("--subject-id", required=True,
                   help="the knee's id: letters, digits, '.', '_', '-' (names its folder)")
    p.add_argument("--out", type=Path, required=True, help="the output folder")
    p.add_argument("--side", default=None,
                   help="L (mirrored), R, or both: a bilateral scan, split between the legs into "
                        "ID_L and ID_R (default: unknown, not mirrored)")
    p.add_argument("--model", default=None, help="model file (default: $KNEEBATCH_MODEL)")
    p.add_argument("--threads", type=int, default=0, help="compute threads (default: all usable)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute a finished subject; replace results of other settings in OUT")
    add_plain_forward(p)
    add_labels(p)
    add_config_options(p)
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("validate", help="preflight a manifest: files, headers, geometry, mask "
                                        "label values; no model")
    p.add_argument("manifest", type=Path, help="cohort CSV: subject_id,ct,mask[,side,...]")
    p.add_argument("--headers-only", action="store_true",
                   help="check files, headers and geometry only (skip reading each mask's labels)")
    add_read_timeout(p)
    add_labels(p)
    add_config_options(p)
    p.set_defaults(func=_cmd_validate)

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
    add_read_timeout(p)
    add_plain_forward(p)
    add_labels(p)
    add_config_options(p)
    add_slurm_options(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("info", help="host, versions and the model's sha256 (job scripts print "
                                    "it first)")
    p.add_argument("--model", default=None,
                   help="check this model file and print its sha256 (default: $KNEEBATCH_MODEL)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("job-script", help="print the worker job script --cluster slurm submits")
    p.add_argument("--threads-per-worker", type=int, default=2,
                   help="compute threads of each dask worker in the job (default: 2)")
    add_slurm_options(p)
    p.set_defaults(func=_cmd_job_script)

    p = sub.add_parser("report", help="QC pictures per subject and cohort figures in OUT/report")
    _add_out_folder(p)
    p.add_argument("--no-qc", action="store_true", help="cohort figures only")
    p.add_argument("--redo-qc", action="store_true", help="redraw existing qc.png too")
    p.add_argument("--by", default=None, metavar="COLUMN",
                   help="group the cosine figure by a manifest column, e.g. --by site")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("status", help="finished / failed / running / pending subjects, rate, ETA")
    _add_out_folder(p)
    p.add_argument("manifest", type=Path, nargs="?", default=None,
                   help="count against this manifest (default: the last run's)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("gather", help="rebuild the Parquet datasets from OUT/subjects")
    _add_out_folder(p)
    p.set_defaults(func=_cmd_gather)

    p = sub.add_parser("merge", help="one dataset from several run folders of the same settings")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="run folders (each gathered), made with the same settings and model")
    p.add_argument("--out", type=Path, required=True,
                   help="the merged folder to write (new, empty, or an earlier merge)")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("export", help="the features as one wide subject x feature table")
    _add_out_folder(p)
    p.add_argument("--wide", type=Path, required=True, metavar="FILE",
                   help="the table to write: FILE.parquet (or FILE.csv), one row per subject, "
                        "columns <region>.<layer>.<i>")
    p.add_argument("--layer", default=None, help="only this layer (default: every layer)")
    p.add_argument("--region", default=None, help="only this region (default: all three)")
    p.set_defaults(func=_cmd_export)
    return parser


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root = logging.getLogger("kneebatch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Returns:
        0 every subject finished; 1 some subject failed; 2 usage or configuration error; 75 stopped
        by a signal (resumable).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "out_option"):
        if getattr(args, "manifest", "") is None and args.out and args.out_option:
            args.manifest, args.out = args.out, None  # `status --out OUT MANIFEST`
        if args.out and args.out_option and args.out != args.out_option:
            parser.error(f"OUT is given twice ({args.out} and --out {args.out_option}); give one.")
        args.out = args.out_option or args.out
        if args.out is None:
            parser.error(f"{args.command} needs the output folder: kneebatch {args.command} OUT "
                         "(or --out OUT)")
    _setup_logging(args.debug, args.quiet)
    try:
        return int(args.func(args))
    except KneebatchError as exc:
        if args.debug:
            log.exception("details")
        print(f"kneebatch: error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED if exc.subject_failure else EXIT_USAGE


def entry() -> None:
    """The ``kneebatch`` command: ``main`` with a quick exit (the imported modules are kept out of
    Python's final garbage collection, which otherwise walks them for seconds)."""
    from kneebatch.runtime import freeze_imports

    code = main()
    freeze_imports()
    sys.exit(code)
