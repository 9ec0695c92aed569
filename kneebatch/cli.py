"""Command line: a thin layer over the package. The only module that sets up logging and prints."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kneebatch import __version__
from kneebatch.config import DEFAULT_LAYERS, LAYERS, CropMode, ExtractionConfig
from kneebatch.errors import ConfigError, KneebatchError

log = logging.getLogger("kneebatch")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SIGNAL = 0, 1, 2, 75


def _spacing(value: str) -> float | None:
    if value == "native":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of mm (e.g. 1.0) or 'native', got {value!r}") from None


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("extraction settings (recorded in every output)")
    group.add_argument("--spacing", type=_spacing, default=1.0, metavar="MM|native",
                       help="isotropic resampling in mm, or 'native' (default: 1.0)")
    group.add_argument("--crop", choices=[c.value for c in CropMode], default="bbox",
                       help="bbox: label box / body + margin (default); none: whole volume")
    group.add_argument("--layers", default=",".join(DEFAULT_LAYERS),
                       help=f"comma-separated, from {','.join(LAYERS)} (default: %(default)s)")
    group.add_argument("--resample-mask", action="store_true",
                       help="put a mask on another grid onto the CT grid (nearest neighbour) "
                            "instead of failing the subject")


def _config(args: argparse.Namespace) -> ExtractionConfig:
    layers = tuple(x.strip() for x in args.layers.split(",") if x.strip())
    return ExtractionConfig(spacing_mm=args.spacing, crop=CropMode(args.crop), layers=layers,
                            resample_mask=args.resample_mask)


def _model_path(args: argparse.Namespace) -> Path:
    value = args.model or os.environ.get("KNEEBATCH_MODEL")
    if not value:
        raise ConfigError("No model file given. Build one with `kneebatch build-model --out "
                          "model3d_state_dict.pth`, then pass --model FILE or set "
                          "KNEEBATCH_MODEL=FILE.")
    return Path(value)


def _cmd_sample(args: argparse.Namespace) -> int:
    from kneebatch.phantom import write_sample

    manifest = write_sample(args.dir, args.subjects, size=args.size, seed=args.seed)
    print(f"Wrote {args.subjects} {args.size} phantom knee(s) and {manifest}")
    return EXIT_OK


def _cmd_build_model(args: argparse.Namespace) -> int:
    from kneebatch.model import build_model, save_model

    network, source = build_model(weights=args.weights, seed=args.seed)
    info = save_model(network, source, args.out)
    print(f"Wrote {args.out} (weights {info.weights}, sha256 {info.sha256[:16]}...)")
    return EXIT_OK


def _print_table(subject_id: str, rows: Sequence[object], weights: str) -> None:
    pairs = [("tibia", "femur"), ("tibia", "background"), ("femur", "background")]
    cos = {(r.layer, r.region_a, r.region_b): r.cosine for r in rows}  # type: ignore[attr-defined]
    layers = list(dict.fromkeys(r.layer for r in rows))  # type: ignore[attr-defined]
    print(f"Cosine similarities for {subject_id} (weights: {weights})")
    print(f"{'layer':<12} " + " ".join(f"{a + '-' + b:>18}" for a, b in pairs))
    for layer in layers:
        print(f"{layer:<12} " + " ".join(f"{cos[(layer, a, b)]:>18.6f}" for a, b in pairs))


def _cmd_extract(args: argparse.Namespace) -> int:
    from kneebatch.manifest import SubjectSpec, check_side, check_subject_id
    from kneebatch.model import get_model
    from kneebatch.runtime import configure_compute, usable_cpus
    from kneebatch.store import SIMILARITIES, subject_dir
    from kneebatch.subject import process_subject

    config = _config(args)
    spec = SubjectSpec(check_subject_id(args.subject_id), args.ct.resolve(), args.mask.resolve(),
                       check_side(args.side))
    configure_compute(args.threads or usable_cpus())
    model = get_model(_model_path(args))
    outcome = process_subject(spec, config, _model_path(args), args.out)
    if not outcome.ok:
        print(f"kneebatch: subject failed at {outcome.stage}: {outcome.error}", file=sys.stderr)
        return EXIT_FAILED
    folder = subject_dir(args.out, spec.subject_id)
    import csv

    with (folder / SIMILARITIES).open() as fh:
        rows = [argparse.Namespace(layer=r["layer"], region_a=r["region_a"],
                                   region_b=r["region_b"], cosine=float(r["cosine"]))
                for r in csv.DictReader(fh)]
    _print_table(spec.subject_id, rows, model.info.weights)
    print(f"Results in {folder}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate from ``main`` so tests and docs can read it)."""
    parser = argparse.ArgumentParser(prog="kneebatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kneebatch {__version__}")
    parser.add_argument("--debug", action="store_true", help="debug logs and full tracebacks")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sample", help="write synthetic knee phantoms and a manifest.csv")
    p.add_argument("dir", type=Path)
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--size", choices=["clinical", "small"], default="clinical",
                   help="clinical: 512x512x~200 at 0.35x0.35x0.8 mm (default); small: for tests")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("build-model", help="inflate DenseNet121 to 3D and write the model file")
    p.add_argument("--weights", default="imagenet", metavar="imagenet|random|PATH",
                   help="imagenet (torchvision download/cache, default), random (seeded; tests and "
                        "offline demos only) or a torchvision densenet121 .pth")
    p.add_argument("--seed", type=int, default=0, help="seed of --weights random")
    p.add_argument("--out", type=Path, default=Path("model3d_state_dict.pth"))
    p.set_defaults(func=_cmd_build_model)

    p = sub.add_parser("extract", help="one knee: features and similarities into OUT/subjects/ID")
    p.add_argument("--ct", type=Path, required=True, help="CT file or DICOM series folder")
    p.add_argument("--mask", type=Path, required=True, help="label mask (1 tibia, 2 femur)")
    p.add_argument("--subject-id", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--side", default=None, help="L (mirrored) or R; default: unknown")
    p.add_argument("--model", default=None, help="model file (default: $KNEEBATCH_MODEL)")
    p.add_argument("--threads", type=int, default=0, help="compute threads (default: all usable)")
    _add_config_options(p)
    p.set_defaults(func=_cmd_extract)
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
    _setup_logging(args.debug, args.quiet)
    try:
        return int(args.func(args))
    except KneebatchError as exc:
        if args.debug:
            log.exception("details")
        print(f"kneebatch: error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED if exc.subject_failure else EXIT_USAGE
