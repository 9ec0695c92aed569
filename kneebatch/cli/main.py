"""Command line: parse, set up logging, dispatch to the command groups' modules. Only ``cli``
prints; every command is a thin layer over the package."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from kneebatch import __version__
from kneebatch.cli import knee, prepare, results, run, validate
from kneebatch.cli.options import EXIT_FAILED, EXIT_INTERNAL, EXIT_USAGE, REPORT
from kneebatch.errors import KneebatchError
from kneebatch.runtime import MALLOC_ARENA_MAX, OMP_WAIT_POLICY, one_malloc_arena

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


def _add_global_flags(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="debug logs and full tracebacks")
    parser.add_argument("--quiet", action="store_true", default=default,
                        help="warnings and errors only")


def build_parser(run_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The argument parser (separate from ``main`` so tests and docs can read it); each command
    group's module adds its own subcommands. ``run_defaults``: ``run``'s option defaults from a
    ``--config`` file (options given on the command line win)."""
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
    for group in (prepare, knee, validate, run, results):
        group.register(sub)
    if run_defaults:
        sub.choices["run"].set_defaults(**run_defaults)
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
        0 every subject finished; 1 some subject failed (the rest are complete); 2 usage or
        configuration error; 3 an internal error (a bug: please report); 75 stopped by a signal
        (resumable).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)  # before torch is imported
    one_malloc_arena()  # before any other thread: this process's reader threads share its heap
    os.environ.setdefault("MALLOC_ARENA_MAX", MALLOC_ARENA_MAX)  # its worker processes' too
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is not None:
        from kneebatch.inputs.settings import load_settings

        try:
            settings = load_settings(args.config)
        except KneebatchError as exc:
            print(f"kneebatch: error: {exc.message}", file=sys.stderr)
            return EXIT_USAGE
        parser = build_parser(settings.run_defaults())
        args = parser.parse_args(argv)
        args.settings = settings
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
    except Exception as exc:  # a bug: a code of its own, so a scheduler does not retry it as data
        log.exception("internal error")
        print(f"kneebatch: internal error: {type(exc).__name__}: {exc}. {REPORT}.",
              file=sys.stderr)
        return EXIT_INTERNAL


def entry() -> None:
    """The ``kneebatch`` command: ``main`` with a quick exit (the imported modules are kept out of
    Python's final garbage collection, which otherwise walks them for seconds)."""
    from kneebatch.runtime import freeze_imports

    code = main()
    freeze_imports()
    sys.exit(code)
