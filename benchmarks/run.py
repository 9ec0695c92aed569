"""Benchmarks: kneebatch against a naive seed-style baseline, measured in one run on this machine.

    python benchmarks/run.py [--json benchmarks/results.json] [--cohort-knees 8]

Prints a table and writes it as JSON. Every number is a ratio against something measured in the
same run: the naive baseline (seed semantics: whole masked volumes at native resolution, float32,
default memory format, the model rebuilt and loaded for every knee) and the best conv3d rate of this
machine. Each measured case runs in a fresh process so its peak RSS and CPU times are its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# ---------------------------------------------------------------- child-process measurements
def _flops(shapes: list[tuple[int, ...]], layers: tuple[str, ...]) -> float:
    """FLOPs of the forward passes (torch.utils.flop_counter on meta tensors: nothing computed)."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kneebatch.network.model import _architecture, grey_input

    net = copy.deepcopy(grey_input(_architecture(), "grey")).to("meta")
    children = list(net.named_children())
    deepest = max(i for i, (name, _) in enumerate(children) if name in layers)
    total = 0.0
    for shape in shapes:
        counter = FlopCounterMode(display=False)
        x = torch.empty((1, 1, *shape), device="meta")
        with counter, torch.no_grad():
            for _, module in children[: deepest + 1]:
                x = module(x)
        total += counter.get_total_flops()
    return total


def _naive(ct: str, mask: str, model: str) -> dict[str, float]:
    """The seed's way: rebuild + load the model, whole masked volumes at native resolution."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from torchvision.models import densenet121

    from kneebatch.network.inflate import collapse_input_channels, inflate

    start = time.perf_counter()
    net = densenet121(weights=None).features
    inflate(net)
    net.load_state_dict(torch.load(model, weights_only=True))
    collapse_input_channels(net.conv0)
    net.eval()
    image = sitk.GetArrayFromImage(sitk.ReadImage(ct)).astype(np.float32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(mask))
    norm = (np.clip(image, -1000, 2000) + 1000) / 3000
    norm = (norm - 0.449) / 0.226
    air = (0 - 0.449) / 0.226
    layers = ("denseblock2", "denseblock3", "denseblock4")
    vectors = {}
    forward = 0.0
    shapes = []
    for region, keep in (("tibia", labels == 1), ("femur", labels == 2),
                         ("background", labels == 0)):
        volume = np.where(keep, norm, air).astype(np.float32)
        shapes.append(volume.shape)
        outputs: dict[str, torch.Tensor] = {}
        hooks = [getattr(net, name).register_forward_hook(
            lambda _m, _i, o, name=name, outputs=outputs: outputs.__setitem__(
                name, o.mean(dim=(2, 3, 4))))
            for name in layers]
        t = time.perf_counter()
        with torch.no_grad():
            net(torch.from_numpy(volume)[None, None])
        forward += time.perf_counter() - t
        for h in hooks:
            h.remove()
        vectors[region] = {k: v[0].numpy() for k, v in outputs.items()}
    return {"knee_s": time.perf_counter() - start, "forward_s": forward,
            "gflop": _flops(shapes, layers) / 1e9}


def _kneebatch(ct: str, mask: str, model: str, native: bool) -> dict[str, float]:
    """kneebatch's per-knee path as a worker runs it: the model is already loaded."""
    from kneebatch.config import ExtractionConfig
    from kneebatch.manifest import SubjectSpec
    from kneebatch.network.model import get_model
    from kneebatch.runtime import configure_compute, usable_cpus
    from kneebatch.subject import compute_subject

    configure_compute(usable_cpus())
    config = ExtractionConfig.seed() if native else ExtractionConfig()
    loaded = get_model(Path(model), config.input_norm, config.conv_padding)
    spec = SubjectSpec("bench", Path(ct), Path(mask), "R")
    start = time.perf_counter()
    result = compute_subject(spec, config, loaded)
    knee = time.perf_counter() - start
    forward = sum(v for k, v in result.timings_s.items() if k.startswith("forward."))
    return {"knee_s": knee, "forward_s": forward,
            "gflop": _flops(list(result.shapes.values()), config.layers) / 1e9,
            **{f"stage_{k}": v for k, v in result.timings_s.items()}}


def _conv_peak() -> dict[str, float]:
    """The best conv3d rate of this machine: DenseNet-3D-like convolutions, best of several."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    from kneebatch.runtime import configure_compute, usable_cpus

    configure_compute(usable_cpus())
    best = 0.0
    for cin, cout, k, stride, shape in [(1, 64, 7, 2, (64, 128, 128)), (128, 32, 3, 1, (24, 48, 48)),
                                        (256, 128, 1, 1, (24, 48, 48)), (512, 128, 1, 1, (12, 24, 24)),
                                        (128, 32, 3, 1, (12, 24, 24))]:
        conv = nn.Conv3d(cin, cout, k, stride=stride, padding=k // 2, bias=False).eval()
        for fmt in (torch.contiguous_format, torch.channels_last_3d):
            conv = conv.to(memory_format=fmt)
            x = torch.randn(1, cin, *shape).contiguous(memory_format=fmt)
            counter = FlopCounterMode(display=False)
            with counter, torch.inference_mode():
                conv(x)
            flops = counter.get_total_flops()
            with torch.inference_mode():
                for _ in range(2):
                    conv(x)
                t = time.perf_counter()
                for _ in range(5):
                    conv(x)
                seconds = (time.perf_counter() - t) / 5
            best = max(best, flops / seconds / 1e9)
    return {"best_gflops": best}


def child(case: str, ct: str, mask: str, model: str) -> None:
    """Run one case and print its JSON, with this process's CPU times and peak RSS."""
    import resource

    if case == "naive":
        out = _naive(ct, mask, model)
    elif case == "conv":
        out = _conv_peak()
    else:
        out = _kneebatch(ct, mask, model, native=case == "seed_semantics")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.update({"user_s": usage.ru_utime, "sys_s": usage.ru_stime,
                "peak_rss_gib": usage.ru_maxrss / 1024**2})
    print("RESULT " + json.dumps(out))


def _extract_cli(ct: Path, mask: Path, model: Path, out: Path, *extra: str) -> dict[str, float]:
    """`kneebatch extract` as a user runs it: a fresh process, the model loaded from its file."""
    command = [sys.executable, "-m", "kneebatch", "--quiet", "extract", "--ct", str(ct), "--mask",
               str(mask), "--subject-id", "bench", "--out", str(out), "--model", str(model),
               "--side", "R", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{command} failed ({status})")
    return {"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "peak_rss_gib": usage.ru_maxrss / 1024**2}


def _in_child(case: str, *args: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "--child", case, *args], capture_output=True,
                          text=True, check=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------- cohort
def _cohort(folder: Path, model: Path, knees: int) -> dict[str, float]:
    """Knees per hour with 1 and 2 one-thread workers on the same cohort; model loads per worker."""
    from distributed import Client, LocalCluster

    from kneebatch.network.model import model_loads
    from kneebatch.phantom import write_sample
    from kneebatch.run import run_cohort

    manifest = write_sample(folder / "cohort", knees, size="clinical", seed=100)
    result: dict[str, float] = {}
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None,
                          env={"OMP_NUM_THREADS": "1"}) as cluster, Client(cluster) as client:
            start = time.perf_counter()
            summary = run_cohort(manifest, folder / f"out{workers}", model, client=client,
                                 gather_results=False)
            seconds = time.perf_counter() - start
            loads = client.run(model_loads)
        assert summary.ok == knees, summary
        result[f"knees_per_hour_{workers}w"] = 3600 * knees / seconds
        result[f"max_model_loads_per_worker_{workers}w"] = max(loads.values())
    result["parallel_efficiency"] = result["knees_per_hour_2w"] / (2 * result["knees_per_hour_1w"])
    return result


def _run_cli(manifest: Path, model: Path, out: Path, *flags: str) -> dict[str, float]:
    """The whole ``kneebatch run`` as a user runs it: a fresh process, default layout (no layout
    flags), imports, cluster start, model load, every knee, gather and shutdown."""
    command = [sys.executable, "-m", "kneebatch", "--quiet", "run", str(manifest), "--out",
               str(out), "--model", str(model), *flags]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return {"wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--cohort-knees", type=int, default=8)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    import SimpleITK as sitk

    from kneebatch.network.model import build_model, save_model
    from kneebatch.phantom import make_phantom

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ct_img, mask_img, _ = make_phantom((216, 512, 512), (0.8, 0.35, 0.35), seed=0, side="R")
        ct, mask = folder / "ct.nii.gz", folder / "mask.nii.gz"
        sitk.WriteImage(ct_img, str(ct))
        sitk.WriteImage(mask_img, str(mask))
        model = folder / "model.pth"
        save_model(*build_model(weights="random", seed=0), model)
        results: dict[str, dict[str, float]] = {"conv3d_peak": _in_child("conv", "", "", "")}
        for case in ("naive", "defaults", "seed_semantics"):
            print(f"measuring {case} ...", file=sys.stderr)
            results[case] = _in_child(case, str(ct), str(mask), str(model))
        print("measuring kneebatch extract ...", file=sys.stderr)
        results["extract_cli_defaults"] = _extract_cli(ct, mask, model, folder / "e1")
        results["extract_cli_seed_semantics"] = _extract_cli(
            ct, mask, model, folder / "e2", "--spacing", "native", "--crop", "none")
        print("measuring the cohort ...", file=sys.stderr)
        results["cohort"] = _cohort(folder, model, args.cohort_knees)
        manifest = folder / "cohort" / "manifest.csv"  # written by _cohort
        for name, flags in (("run_cli_defaults", ()), ("run_cli_plain_forward", ("--plain-forward",))):
            print(f"measuring {name} ...", file=sys.stderr)
            results[name] = _run_cli(manifest, model, folder / name, *flags)

    peak = results["conv3d_peak"]["best_gflops"]
    naive_kph = 3600 / results["naive"]["knee_s"]
    rows = []
    for case in ("naive", "defaults", "seed_semantics"):
        r = results[case]
        r["knees_per_hour"] = 3600 / r["knee_s"]
        r["speedup_vs_naive"] = r["knees_per_hour"] / naive_kph
        r["forward_gflops"] = r["gflop"] / r["forward_s"]
        r["forward_fraction_of_peak"] = r["forward_gflops"] / peak
        r["sys_over_user"] = r["sys_s"] / r["user_s"]
        rows.append(f"| {case} | {r['knee_s']:.1f} | {r['knees_per_hour']:.0f} | "
                    f"{r['speedup_vs_naive']:.1f}x | {r['user_s']:.1f} / {r['sys_s']:.1f} | "
                    f"{r['peak_rss_gib']:.2f} | {r['gflop']:.0f} | {r['forward_gflops']:.1f} "
                    f"({100 * r['forward_fraction_of_peak']:.0f}%) |")
    cli = [f"| `kneebatch extract` {name} (fresh process: imports, model load, one knee) | "
           f"{r['wall_s']:.1f} s | {3600 / r['wall_s']:.0f} knees/h "
           f"({3600 / r['wall_s'] / naive_kph:.1f}x naive) | "
           f"{r['user_s']:.1f} / {r['sys_s']:.1f} s | {r['peak_rss_gib']:.2f} GiB |"
           for name, r in (("defaults", results["extract_cli_defaults"]),
                           ("seed semantics", results["extract_cli_seed_semantics"]))]
    runs = [f"| `kneebatch run` {name}, {args.cohort_knees} knees (fresh process, default layout, "
            f"start-up and gather included) | {r['wall_s']:.1f} s | "
            f"{3600 * args.cohort_knees / r['wall_s']:.0f} knees/h "
            f"({3600 * args.cohort_knees / r['wall_s'] / naive_kph:.1f}x naive) | | |"
            for name, r in (("defaults", results["run_cli_defaults"]),
                            ("--plain-forward", results["run_cli_plain_forward"]))]
    c = results["cohort"]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "description": machine}  # type: ignore[dict-item]
    table = "\n".join([
        f"Machine: {machine}; best conv3d rate {peak:.1f} GFLOP/s; clinical knee 512x512x216 at "
        "0.35x0.35x0.8 mm",
        "",
        "| case | s/knee | knees/h | vs naive | CPU user / sys s | peak RSS GiB | GFLOP | "
        "forward GFLOP/s (of best conv3d) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "| command | wall | rate | CPU user / sys | peak RSS |",
        "|---|---|---|---|---|",
        *cli,
        *runs,
        "",
        f"Cohort of {args.cohort_knees} clinical knees: {c['knees_per_hour_1w']:.0f} knees/h with 1 "
        f"worker, {c['knees_per_hour_2w']:.0f} with 2 (parallel efficiency "
        f"{100 * c['parallel_efficiency']:.0f}%); model loads per worker: "
        f"{c['max_model_loads_per_worker_2w']:.0f}.",
    ])
    print(table)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
