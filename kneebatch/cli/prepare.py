"""Commands that prepare a run: ``sample`` (phantoms), ``build-model``, ``info`` (host, versions,
model) and ``job-script`` (the worker job script ``--cluster slurm`` submits)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kneebatch import __version__
from kneebatch.cli.options import EXIT_OK, add_slurm_options, slurm_options_from_args
from kneebatch.errors import ConfigError


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


def _cmd_info(args: argparse.Namespace) -> int:
    import platform
    import socket

    import SimpleITK
    import torch
    import torchvision

    from kneebatch.citation import citation
    from kneebatch.network.modelfile import check_model_file
    from kneebatch.network.options import bf16_supported
    from kneebatch.runtime import usable_cpus

    job = os.environ.get("SLURM_JOB_ID")
    print(f"kneebatch {__version__} on {socket.gethostname()}"
          + (f" (SLURM job {job})" if job else "") + f", {usable_cpus()} usable CPU(s); python "
          f"{platform.python_version()} ({sys.executable}), torch {torch.__version__} (CUDA "
          f"{'available' if torch.cuda.is_available() else 'not available'}), torchvision "
          f"{torchvision.__version__}, SimpleITK {SimpleITK.Version.VersionString()}")
    print("native bfloat16: " + ("yes (AVX512-BF16/AMX): --precision bf16 runs the network "
                                 "faster here" if bf16_supported() else
                                 "no (AVX2 or older): use float32, the default"))
    value = args.model or os.environ.get("KNEEBATCH_MODEL")
    if value:
        info = check_model_file(Path(value))  # a bad model file fails the job here, at once
        print(f"model {value}: sha256 {info.sha256}, weights {info.weights}")
    print(f"to cite: {citation()}")
    return EXIT_OK


def _cmd_job_script(args: argparse.Namespace) -> int:
    from kneebatch.cohort.cluster import slurm_cluster

    with slurm_cluster(slurm_options_from_args(args), args.threads_per_worker or 2) as cluster:
        print(cluster.job_script())
    return EXIT_OK


def _cmd_tls_credentials(args: argparse.Namespace) -> int:
    from kneebatch.cohort.credentials import write_credentials

    files = write_credentials(args.dir)
    print(f"--tls-ca-file {files.ca} --tls-cert {files.cert} --tls-key {files.key}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sample``, ``build-model``, ``info``, ``job-script``, ``tls-credentials``
    command(s) to the parser."""
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

    p = sub.add_parser("tls-credentials", help="a new CA and the certificate it signs for one "
                                               "multi-node job's scheduler, workers and run")
    p.add_argument("dir", type=Path, help="folder to create (mode 0700; on the shared filesystem, "
                                          "e.g. OUT/.kneebatch/tls-$SLURM_JOB_ID)")
    p.set_defaults(func=_cmd_tls_credentials)
