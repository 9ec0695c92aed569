"""Command line: a thin layer over the package. The only module that sets up logging; it parses
the arguments and runs a command of ``cli_commands`` (which, like this module, prints)."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kneebatch import __version__
from kneebatch.cli_commands import (
    EXIT_FAILED,
    EXIT_USAGE,
    cmd_build_model,
    cmd_export,
    cmd_extract,
    cmd_gather,
    cmd_info,
    cmd_job_script,
    cmd_merge,
    cmd_report,
    cmd_run,
    cmd_sample,
    cmd_status,
    cmd_validate,
)
from kneebatch.cli_options import (
    add_config_options,
    add_labels,
    add_plain_forward,
    add_read_timeout,
    add_slurm_options,
)
from kneebatch.errors import KneebatchError

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
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("build-model", help="inflate DenseNet121 to 3D and write the model file")
    p.add_argument("--weights", default="imagenet", metavar="imagenet|random|PATH",
                   help="imagenet (torchvision download/cache, default), random (seeded; tests and "
                        "offline demos only) or a torchvision densenet121 .pth")
    p.add_argument("--seed", type=int, default=0, help="seed of --weights random")
    p.add_argument("--out", type=Path, default=Path("model3d_state_dict.pth"),
                   help="the model file to write, with its sidecar .json beside it (default: "
                        "%(default)s)")
    p.set_defaults(func=cmd_build_model)

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
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("validate", help="preflight a manifest: files, headers, geometry, mask "
                                        "label values; no model")
    p.add_argument("manifest", type=Path, help="cohort CSV: subject_id,ct,mask[,side,...]")
    p.add_argument("--headers-only", action="store_true",
                   help="check files, headers and geometry only (skip reading each mask's labels)")
    add_read_timeout(p)
    add_labels(p)
    add_config_options(p)
    p.set_defaults(func=cmd_validate)

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
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("info", help="host, versions and the model's sha256 (job scripts print "
                                    "it first)")
    p.add_argument("--model", default=None,
                   help="check this model file and print its sha256 (default: $KNEEBATCH_MODEL)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("job-script", help="print the worker job script --cluster slurm submits")
    p.add_argument("--threads-per-worker", type=int, default=2,
                   help="compute threads of each dask worker in the job (default: 2)")
    add_slurm_options(p)
    p.set_defaults(func=cmd_job_script)

    p = sub.add_parser("report", help="QC pictures per subject and cohort figures in OUT/report")
    _add_out_folder(p)
    p.add_argument("--no-qc", action="store_true", help="cohort figures only")
    p.add_argument("--redo-qc", action="store_true", help="redraw existing qc.png too")
    p.add_argument("--by", default=None, metavar="COLUMN",
                   help="group the cosine figure by a manifest column, e.g. --by site")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("status", help="finished / failed / running / pending subjects, rate, ETA")
    _add_out_folder(p)
    p.add_argument("manifest", type=Path, nargs="?", default=None,
                   help="count against this manifest (default: the last run's)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("gather", help="rebuild the Parquet datasets from OUT/subjects")
    _add_out_folder(p)
    p.set_defaults(func=cmd_gather)

    p = sub.add_parser("merge", help="one dataset from several run folders of the same settings")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="run folders (each gathered), made with the same settings and model")
    p.add_argument("--out", type=Path, required=True,
                   help="the merged folder to write (new, empty, or an earlier merge)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="the features as one wide subject x feature table")
    _add_out_folder(p)
    p.add_argument("--wide", type=Path, required=True, metavar="FILE",
                   help="the table to write: FILE.parquet (or FILE.csv), one row per subject, "
                        "columns <region>.<layer>.<i>")
    p.add_argument("--layer", default=None, help="only this layer (default: every layer)")
    p.add_argument("--region", default=None, help="only this region (default: all three)")
    p.set_defaults(func=cmd_export)
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
