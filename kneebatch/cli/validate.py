"""The ``validate`` command: prints what ``cohort.validate`` finds, row by row."""

from __future__ import annotations

import argparse
from pathlib import Path

from kneebatch.cli.options import (
    EXIT_FAILED,
    EXIT_OK,
    add_config_options,
    add_labels,
    add_read_timeout,
    config_from_args,
)


def _cmd_validate(args: argparse.Namespace) -> int:
    from kneebatch.cohort.validate import validate_manifest
    from kneebatch.extract.memory import gib

    rows = problems = 0
    for check in validate_manifest(args.manifest, config_from_args(args), args.labels,
                                   read_timeout_s=args.read_timeout,
                                   headers_only=args.headers_only):
        rows += 1
        if not check.ok:
            problems += 1
            print(f"FAIL {check.subject_id or '(no id)'}: {check.problem}")
            continue
        header = check.header
        assert header is not None  # a fine row has its header
        print(f"ok   {check.subject_id}: {header.size[0]}x{header.size[1]}x{header.size[2]} "
              f"{header.pixel}, spacing {tuple(round(s, 3) for s in header.spacing)} mm, "
              f"needs about {gib(check.need_bytes)} per worker"
              + "".join(f"; note: {n}" for n in check.notes))
    print(f"{rows - problems} of {rows} subject(s) look fine; {problems} problem(s).")
    skipped = []
    if args.headers_only:
        skipped.append("each mask's values and anatomy and the CT's middle slice "
                       "(--headers-only)")
    if args.resample_mask:
        skipped.append("CT and mask on one grid (--resample-mask: run resamples the mask)")
    skipped.append("NaN or inf in the CT (run's full read finds them)")
    print("Not checked: " + "; ".join(skipped) + ".")
    return EXIT_FAILED if problems else EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``validate`` command(s) to the parser."""
    p = sub.add_parser("validate", help="preflight a manifest: files, headers, geometry, mask "
                                        "label values; no model")
    p.add_argument("manifest", type=Path, help="cohort CSV: subject_id,ct,mask[,side,...]")
    p.add_argument("--headers-only", action="store_true",
                   help="check files, headers and geometry only (skip reading each mask's labels)")
    add_read_timeout(p)
    add_labels(p)
    add_config_options(p)
    p.set_defaults(func=_cmd_validate)
