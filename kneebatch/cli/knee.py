"""The ``extract`` command: one knee (or both legs of a bilateral scan) into OUT/subjects/ID."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kneebatch.cli.options import (
    EXIT_FAILED,
    EXIT_OK,
    add_config_options,
    add_labels,
    add_plain_forward,
    config_from_args,
    forward_from_args,
    model_file,
)
from kneebatch.config import PAIRS

if TYPE_CHECKING:
    from kneebatch.schema import SimilarityRow


def _print_table(subject_id: str, rows: Sequence[SimilarityRow], weights: str) -> None:
    cos = {(r.layer, r.region_a, r.region_b): r.cosine for r in rows}
    layers = list(dict.fromkeys(r.layer for r in rows))
    print(f"Cosine similarities for {subject_id} (weights: {weights})")
    print(f"{'layer':<12} " + " ".join(f"{a + '-' + b:>18}" for a, b in PAIRS))
    for layer in layers:
        print(f"{layer:<12} " + " ".join(f"{cos[(layer, a, b)]:>18.6f}" for a, b in PAIRS))


def _cmd_extract(args: argparse.Namespace) -> int:
    from kneebatch.cohort.task import process_subject
    from kneebatch.inputs.manifest import knees, subject_spec
    from kneebatch.network.cache import get_model
    from kneebatch.network.options import check_precision
    from kneebatch.outdir.folder import open_out
    from kneebatch.outdir.records import SettingsRecord
    from kneebatch.results.subject_files import read_similarities, subject_dir
    from kneebatch.runtime import configure_compute, usable_cpus

    config = config_from_args(args)
    specs = knees(subject_spec(args.subject_id, args.ct, args.mask, args.side, args.labels))
    configure_compute(args.threads or usable_cpus())
    check_precision(config.precision)
    model_path = model_file(args)
    # A bad model file is a usage error (exit 2), not a subject's.
    model = get_model(model_path, config.input_norm, config.conv_padding)
    run_id = open_out(args.out, SettingsRecord(config.hash(), model.info.sha256,
                                               model.info.weights, config.to_dict()),
                      command="extract", overwrite=args.overwrite)
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``extract`` command(s) to the parser."""
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
