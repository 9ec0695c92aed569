"""The command line's shared options: extraction settings, forward switches, read time-out and
SLURM worker jobs, and the values they build. Configures argparse only; ``cli`` runs and prints."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kneebatch.config import (
    CONV_PADDINGS,
    DEFAULT_LAYERS,
    INPUT_NORMS,
    LAYERS,
    POOLINGS,
    PRECISIONS,
    CropMode,
    ExtractionConfig,
)
from kneebatch.errors import ConfigError, KneebatchError
from kneebatch.inputs.labels import LabelMap

if TYPE_CHECKING:
    from kneebatch.cohort.cluster import ClusterSpec, SlurmOptions
    from kneebatch.network.options import ForwardOptions


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_SIGNAL = 0, 1, 2, 3, 75  # see `main`
REPORT = ("This is a kneebatch bug, not a problem with your data: please report it with this "
          "output, the command and `kneebatch info`")


def _spacing(value: str) -> float | str:
    if value == "native":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of mm (e.g. 1.0) or 'native', got {value!r}") from None


def add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "extraction settings (recorded in every output; an option given wins over --preset)")
    group.add_argument("--preset", choices=["default", "seed"], default="default",
                       help="seed: every seed-fidelity choice at once (--spacing native --crop "
                            "none --pooling crop --input-norm grey --conv-padding zeros) "
                            "(default: default)")
    group.add_argument("--spacing", type=_spacing, default=None, metavar="MM|native",
                       help="isotropic resampling in mm, or 'native' (default: 1.0)")
    group.add_argument("--crop", choices=[c.value for c in CropMode], default=None,
                       help="bbox: label box / body + margin (default); none: whole volume")
    group.add_argument("--margin-mm", type=float, default=None, metavar="MM",
                       help="margin around each crop box (default: 10)")
    group.add_argument("--pooling", choices=list(POOLINGS), default=None,
                       help="region: each layer averaged over its region's voxels only "
                            "(default); crop: over the whole network input")
    group.add_argument("--input-norm", choices=list(INPUT_NORMS), default=None,
                       help="imagenet: ImageNet's per-channel mean/std folded into conv0, air "
                            "padding (default); grey: the seed's one grey mean/std")
    group.add_argument("--conv-padding", choices=list(CONV_PADDINGS), default=None,
                       help="how convolutions after conv0 pad: replicate (a crop face looks "
                            "like more air; default) or zeros (torchvision's)")
    group.add_argument("--layers", default=None,
                       help=f"comma-separated, from {','.join(LAYERS)} "
                            f"(default: {','.join(DEFAULT_LAYERS)})")
    group.add_argument("--resample-mask", action="store_true",
                       help="put a mask on another grid onto the CT grid (nearest neighbour) "
                            "instead of failing the subject")
    group.add_argument("--precision", choices=list(PRECISIONS), default=None,
                       help="forward pass in float32 (default) or bfloat16 (CPUs with "
                            "AVX512-BF16/AMX; pooling and cosines stay float32)")


def _labels(value: str) -> LabelMap:
    try:
        return LabelMap.parse(value)
    except KneebatchError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def add_labels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", type=_labels, default=LabelMap(), metavar="tibia=V,femur=V",
                        help="the mask values of each bone, any integers; several per bone as "
                             "femur=75+76 (default: tibia=1,femur=2; 0 is always background). "
                             "A manifest's tibia_label / femur_label columns override it per row")


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def add_read_timeout(parser: argparse.ArgumentParser) -> None:
    from kneebatch.config import READ_TIMEOUT_S

    parser.add_argument("--read-timeout", type=positive_seconds, default=READ_TIMEOUT_S, metavar="S",
                        help="a CT or mask that gives no answer for S seconds (a hung network "
                             "mount) fails its subject at stage read (default: %(default)g)")


def config_from_args(args: argparse.Namespace) -> ExtractionConfig:
    """The extraction settings: ``--preset``, else the ``--config`` file's (``args.settings``),
    else the defaults; each option given on the command line wins."""
    given: dict[str, Any] = {"resample_mask": True} if args.resample_mask else {}
    if args.spacing is not None:
        given["spacing_mm"] = None if args.spacing == "native" else args.spacing
    if args.layers is not None:
        given["layers"] = tuple(x.strip() for x in args.layers.split(",") if x.strip())
    for option, field in (("crop", "crop"), ("margin_mm", "margin_mm"), ("pooling", "pooling"),
                          ("input_norm", "input_norm"), ("conv_padding", "conv_padding"),
                          ("precision", "precision")):
        if getattr(args, option) is not None:
            given[field] = getattr(args, option)
    if args.preset == "seed":
        return ExtractionConfig.seed(**given)
    settings = getattr(args, "settings", None)
    return dataclasses.replace(settings.config(), **given) if settings else ExtractionConfig(**given)


def add_plain_forward(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plain-forward", action="store_true",
                        help="debugging: torchvision's own forward in the default memory format "
                             "(no channels_last, stem slabs or lean blocks; same numbers, slower)")


def forward_from_args(args: argparse.Namespace) -> ForwardOptions:
    from kneebatch.network.options import ForwardOptions

    return ForwardOptions.plain() if args.plain_forward else ForwardOptions()


def slurm_options_from_args(args: argparse.Namespace) -> SlurmOptions:
    from kneebatch.cohort.cluster import SlurmOptions

    return SlurmOptions(cores=args.slurm_cores, memory=args.slurm_memory,
                        walltime=args.slurm_walltime, partition=args.slurm_partition,
                        account=args.slurm_account, directives=tuple(args.slurm_directive),
                        max_jobs=args.slurm_max_jobs, prologue=tuple(args.prologue),
                        log_dir=args.log_dir, interface=args.interface)


def cluster_spec_from_args(args: argparse.Namespace) -> ClusterSpec:
    from kneebatch.cohort.cluster import ClusterSpec

    slurm = slurm_options_from_args(args) if args.cluster == "slurm" else None
    if slurm and (args.scheduler_file or args.scheduler_address):
        raise ConfigError("--cluster slurm starts its own scheduler; drop --scheduler-file/-address.")
    if args.tls_dir and not (args.scheduler_file or args.scheduler_address):
        raise ConfigError("--tls-dir is for joining a scheduler (--scheduler-file or "
                          "--scheduler-address); the local cluster makes its own credentials.")
    memory = 0
    if args.memory_per_worker:
        from dask.utils import parse_bytes

        try:
            memory = parse_bytes(args.memory_per_worker)
        except ValueError as exc:
            raise ConfigError(f"--memory-per-worker {args.memory_per_worker!r} is not a size; "
                              "e.g. --memory-per-worker 4GB.") from exc
    return ClusterSpec(workers=args.workers, threads_per_worker=args.threads_per_worker,
                       scheduler_file=args.scheduler_file,
                       scheduler_address=args.scheduler_address, tls_dir=args.tls_dir,
                       memory_limit_bytes=memory,
                       slurm=slurm, dashboard=args.dashboard,
                       subjects_per_worker=args.subjects_per_worker,
                       wait_workers=args.wait_workers)


def add_slurm_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SLURM worker jobs (--cluster slurm, via dask-jobqueue)")
    group.add_argument("--slurm-cores", type=int, default=None,
                       help="cores per job (default: the site's jobqueue.slurm.cores, else 8)")
    group.add_argument("--slurm-memory", default=None,
                       help="memory per job (default: the site's jobqueue.slurm.memory, else 32GB)")
    group.add_argument("--slurm-walltime", default=None,
                       help="per job (default: the site's jobqueue.slurm.walltime, else 04:00:00)")
    group.add_argument("--slurm-partition", default=None,
                       help="partition of the worker jobs (default: the site's)")
    group.add_argument("--slurm-account", default=None,
                       help="account the worker jobs are charged to (default: yours)")
    group.add_argument("--slurm-directive", action="append", default=[], metavar="OPT",
                       help="extra #SBATCH option, e.g. --slurm-directive=--qos=long (repeatable)")
    group.add_argument("--slurm-max-jobs", type=int, default=4,
                       help="at most this many worker jobs at once (default: 4)")
    prologue = os.environ.get("KNEEBATCH_PROLOGUE")
    group.add_argument("--prologue", action="append", default=[prologue] if prologue else [],
                       metavar="LINE",
                       help="a shell line each worker job runs first, e.g. --prologue 'module "
                            "load python/3.11' (repeatable; default: $KNEEBATCH_PROLOGUE)")
    group.add_argument("--log-dir", default=None, metavar="DIR",
                       help="folder for the worker jobs' logs (default: where you start)")
    group.add_argument("--interface", default=None, metavar="NAME",
                       help="network interface the scheduler and workers talk over, e.g. ib0 "
                            "(default: dask's choice)")


def add_out_folder(parser: argparse.ArgumentParser) -> None:
    """OUT as the first argument or as ``--out``, the way ``run`` and ``extract`` spell it."""
    parser.add_argument("out", type=Path, nargs="?", default=None, metavar="OUT",
                        help="the output folder of a run (or give it as --out OUT)")
    parser.add_argument("--out", type=Path, dest="out_option", default=None, metavar="OUT",
                        help="the same as the OUT argument")


def model_file(args: argparse.Namespace) -> Path:
    value = args.model or os.environ.get("KNEEBATCH_MODEL")
    if not value:
        raise ConfigError("No model file given. Build one with `kneebatch build-model --out "
                          "model3d_state_dict.pth`, then pass --model FILE or set "
                          "KNEEBATCH_MODEL=FILE.")
    return Path(value)
