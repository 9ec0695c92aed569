"""Benchmarks: kneebatch against a naive seed-style baseline, measured in one run on this machine.

    python benchmarks/run.py [--json benchmarks/results.json] [--cohort-knees 8] [--steady-knees 32]

Prints a table and writes it as JSON. Every number is a ratio against something measured in the
same run: the naive baseline (seed semantics: whole masked volumes at native resolution, float32,
default memory format, the model rebuilt and loaded for every knee) and the best conv3d rate of this
machine. Each measured case runs in a fresh process so its peak RSS and CPU times are its own;
one also computes another knee first (a worker's steady state: one-time costs already paid) and
then the measured knee three times (the median reported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


# ---------------------------------------------------------------- child-process measurements
def _naive(ct: str, mask: str, model: str) -> dict[str, Any]:
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
            "shapes": shapes, "layers": layers}


def _kneebatch(ct: str, mask: str, model: str, native: bool,
               before: tuple[str, str] | None = None) -> dict[str, Any]:
    """kneebatch's per-knee path as a worker runs it: the model is already loaded; ``before``: a
    worker's steady state, another knee (other shapes) computed first in the same process, so
    the one-time costs (oneDNN's kernel generation, first reads) are paid before the clock; the
    measured knee then ``STEADY_REPEATS`` times, the median reported."""
    from kneebatch.config import ExtractionConfig
    from kneebatch.extract.pipeline import compute_subject
    from kneebatch.inputs.manifest import SubjectSpec
    from kneebatch.network.cache import get_model
    from kneebatch.runtime import configure_compute, usable_cpus

    configure_compute(usable_cpus())
    config = ExtractionConfig.seed() if native else ExtractionConfig()
    loaded = get_model(Path(model), config.input_norm, config.conv_padding)
    if before:
        compute_subject(SubjectSpec("warm", Path(before[0]), Path(before[1]), "R"), config, loaded)
    spec = SubjectSpec("bench", Path(ct), Path(mask), "R")
    measured = []  # (knee seconds, forward seconds, result)
    for _ in range(STEADY_REPEATS if before else 1):
        start = time.perf_counter()
        result = compute_subject(spec, config, loaded)
        knee = time.perf_counter() - start
        measured.append((knee, sum(v for k, v in result.timings_s.items()
                                   if k.startswith("forward.")), result))
    knee, forward, result = sorted(measured, key=lambda m: m[1])[len(measured) // 2]  # median
    return {"knee_s": knee, "forward_s": forward, "forward_s_all": [m[1] for m in measured],
            "shapes": list(result.shapes.values()), "layers": config.layers,
            **{f"stage_{k}": v for k, v in result.timings_s.items()}}


# A worker's steady state: the measured knee this many times after the other one, the median
# reported (this host's speed moves by 10-25% between minutes; the yardstick is a best of 5).
STEADY_REPEATS = 3


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


def child(case: str, ct: str, mask: str, model: str, *before: str) -> None:
    """Run one case and print its JSON, with this process's CPU times and peak RSS."""
    import resource

    out: dict[str, Any]
    if case == "naive":
        out = _naive(ct, mask, model)
    elif case == "conv":
        out = _conv_peak()
    else:
        out = _kneebatch(ct, mask, model, native=case == "seed_semantics",
                         before=(before[0], before[1]) if before else None)
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
    """One case in a fresh process; its forward's FLOPs counted here (the counter's imports would
    add to the child's peak RSS)."""
    from kneebatch.network.flops import forward_flops

    done = subprocess.run([sys.executable, __file__, "--child", case, *args], capture_output=True,
                          text=True, check=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    if "shapes" in out:
        shapes = [tuple(shape) for shape in out.pop("shapes")]
        out["gflop"] = forward_flops(shapes, tuple(out.pop("layers"))) / 1e9
    return out


def _cpu_name() -> str:
    """The CPU's model name and whether it has native bfloat16 (the figures depend on both)."""
    from kneebatch.network.options import bf16_supported

    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({'native bf16' if bf16_supported() else 'no native bf16'})"


# ---------------------------------------------------------------- whole commands
def _cohorts(folder: Path, knees: int, steady: int) -> dict[int, Path]:
    """Manifests of ``knees`` and ``steady`` clinical phantoms (the first a prefix of the second)."""
    from kneebatch.inputs.phantom import write_sample

    big = write_sample(folder / "cohort", max(knees, steady), size="clinical", seed=100)
    lines = big.read_text().splitlines()
    small = big.with_name(f"first{knees}.csv")
    small.write_text("\n".join(lines[: knees + 1]) + "\n")
    return {knees: small, steady: big}


def _run_cli(manifest: Path, model: Path, out: Path, *flags: str, compete: bool = False,
             env: dict[str, str] | None = None) -> dict[str, float]:
    """The whole ``kneebatch run`` as a user runs it: a fresh process, imports, cluster start,
    model load, every knee, gather and shutdown. ``compete``: another process keeps one core busy
    meanwhile (a shared node)."""
    command = [sys.executable, "-m", "kneebatch", "--quiet", "run", str(manifest), "--out",
               str(out), "--model", str(model), *flags]
    burner = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if compete else None)
    try:
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, **(env or {})})
        wall = time.perf_counter() - start
    finally:
        if burner:
            burner.kill()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    record = json.loads((out / "run.json").read_text())
    stages = record.get("stage_seconds", {})
    return {"wall_s": wall, "inside_s": record.get("wall_s", 0.0),
            **{f"stage_{k}": v for k, v in stages.items()}}


RUNS = {  # name: (flags, compete, env): layouts and switches of the whole `kneebatch run`
    "defaults (1 worker x 2 threads, reads ahead)": ((), False, {}),
    "--subjects-per-worker 1 (no read-ahead)": (("--subjects-per-worker", "1"), False, {}),
    "--plain-forward": (("--plain-forward",), False, {}),
    "--workers 2 --threads-per-worker 1": (("--workers", "2", "--threads-per-worker", "1"),
                                           False, {}),
    "--workers 1 --threads-per-worker 1": (("--workers", "1", "--threads-per-worker", "1"),
                                           False, {}),
    # kneebatch sets OMP_WAIT_POLICY=PASSIVE unless the user set it; set empty it is libgomp's
    # own default (spin a while, then sleep), kneebatch's default until the ninth session
    "OMP_WAIT_POLICY libgomp's default (spinning)": ((), False, {"OMP_WAIT_POLICY": ""}),
    # kneebatch gives every thread glibc's main heap (MALLOC_ARENA_MAX=1) unless the user set
    # it; glibc's own default is 8 arenas per core (each reader thread its own)
    "MALLOC_ARENA_MAX glibc's default (an arena per thread)": (
        (), False, {"MALLOC_ARENA_MAX": str(8 * (os.cpu_count() or 1))}),
    "defaults, another process busy on one core": ((), True, {}),
    "same, OMP_WAIT_POLICY libgomp's default (spinning)": ((), True, {"OMP_WAIT_POLICY": ""}),
}
BF16_RUN = {"--precision bf16": (("--precision", "bf16"), False, {})}  # native bf16 CPUs only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--cohort-knees", type=int, default=8)
    parser.add_argument("--steady-knees", type=int, default=32)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    import SimpleITK as sitk

    from kneebatch.inputs.phantom import make_phantom
    from kneebatch.network.modelfile import save_model
    from kneebatch.network.weights import build_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ct_img, mask_img, _ = make_phantom((216, 512, 512), (0.8, 0.35, 0.35), seed=0, side="R")
        ct, mask = folder / "ct.nii.gz", folder / "mask.nii.gz"
        sitk.WriteImage(ct_img, str(ct))
        sitk.WriteImage(mask_img, str(mask))
        other_img, other_mask_img, _ = make_phantom((200, 480, 480), (0.8, 0.35, 0.35), seed=1,
                                                    side="R")
        other, other_mask = folder / "other.nii.gz", folder / "other_mask.nii.gz"
        sitk.WriteImage(other_img, str(other))
        sitk.WriteImage(other_mask_img, str(other_mask))
        model = folder / "model.pth"
        save_model(*build_model(weights="random", seed=0), model)
        # The yardstick of each in-process case is measured just before and after it: this
        # host's speed drifts by up to 40% within minutes (other tenants), and a forward's
        # fraction of the machine's best means something only against the same minutes.
        peaks = [_in_child("conv", "", "", "")["best_gflops"]]
        results: dict[str, dict[str, float]] = {}
        for case, extra in (("naive", ()), ("defaults", ()), ("seed_semantics", ()),
                            ("defaults_warm", (str(other), str(other_mask)))):
            print(f"measuring {case} ...", file=sys.stderr)
            results[case] = _in_child(case.removesuffix("_warm"), str(ct), str(mask), str(model),
                                      *extra)
            peaks.append(_in_child("conv", "", "", "")["best_gflops"])
            results[case]["conv3d_peak_gflops"] = max(peaks[-2:])
        results["conv3d_peak"] = {"best_gflops": max(peaks), "all_gflops": peaks}  # type: ignore[dict-item]
        print("measuring kneebatch extract ...", file=sys.stderr)
        results["extract_cli_defaults"] = _extract_cli(ct, mask, model, folder / "e1")
        results["extract_cli_seed_semantics"] = _extract_cli(
            ct, mask, model, folder / "e2", "--preset", "seed")
        manifests = _cohorts(folder, args.cohort_knees, args.steady_knees)
        from kneebatch.network.options import bf16_supported

        runs: dict[str, dict[str, float]] = {}
        cases = {**RUNS, **(BF16_RUN if bf16_supported() else {})}
        for i, (name, (flags, compete, env)) in enumerate(cases.items()):
            print(f"measuring kneebatch run {name} ...", file=sys.stderr)
            runs[name] = _run_cli(manifests[args.cohort_knees], model, folder / f"run{i}",
                                  *flags, compete=compete, env=env)
        print(f"measuring kneebatch run defaults on {args.steady_knees} knees ...",
              file=sys.stderr)
        steady = _run_cli(manifests[args.steady_knees], model, folder / "steady")
        results["runs"] = runs  # type: ignore[assignment]
        results["steady"] = steady

    naive_kph = 3600 / results["naive"]["knee_s"]
    rows = []
    labels = {"defaults_warm": f"defaults, after another knee (a worker's steady state, median "
                               f"of {STEADY_REPEATS}; CPU and peak of all)"}
    for case in ("naive", "defaults", "defaults_warm", "seed_semantics"):
        r = results[case]
        r["knees_per_hour"] = 3600 / r["knee_s"]
        r["speedup_vs_naive"] = r["knees_per_hour"] / naive_kph
        r["forward_gflops"] = r["gflop"] / r["forward_s"]
        r["forward_fraction_of_peak"] = r["forward_gflops"] / r["conv3d_peak_gflops"]
        r["sys_over_user"] = r["sys_s"] / r["user_s"]
        rows.append(f"| {labels.get(case, case)} | {r['knee_s']:.1f} | {r['knees_per_hour']:.0f} | "
                    f"{r['speedup_vs_naive']:.1f}x | {r['user_s']:.1f} / {r['sys_s']:.1f} | "
                    f"{r['peak_rss_gib']:.2f} | {r['gflop']:.0f} | {r['forward_gflops']:.1f} "
                    f"({100 * r['forward_fraction_of_peak']:.0f}% of "
                    f"{r['conv3d_peak_gflops']:.0f}) |")
    cli = [f"| `kneebatch extract` {name} (fresh process: imports, model load, one knee) | "
           f"{r['wall_s']:.1f} s | {3600 / r['wall_s']:.0f} knees/h "
           f"({3600 / r['wall_s'] / naive_kph:.1f}x naive) | "
           f"{r['user_s']:.1f} / {r['sys_s']:.1f} s | {r['peak_rss_gib']:.2f} GiB |"
           for name, r in (("defaults", results["extract_cli_defaults"]),
                           ("seed semantics", results["extract_cli_seed_semantics"]))]
    run_rows = [f"| `kneebatch run` {name}, {args.cohort_knees} knees | {r['wall_s']:.1f} s | "
                f"{3600 * args.cohort_knees / r['wall_s']:.0f} knees/h "
                f"({3600 * args.cohort_knees / r['wall_s'] / naive_kph:.1f}x naive) | "
                f"{r['wall_s'] - r['inside_s']:.1f} s | {r.get('stage_read', 0):.1f} / "
                f"{r.get('stage_preprocess', 0):.1f} / "
                f"{sum(v for k, v in r.items() if k.startswith('stage_forward')):.1f} s |"
                for name, r in runs.items()]
    s32 = steady
    run_rows.append(f"| `kneebatch run` defaults, {args.steady_knees} knees | {s32['wall_s']:.1f} s | "
                    f"{3600 * args.steady_knees / s32['wall_s']:.0f} knees/h "
                    f"({3600 * args.steady_knees / s32['wall_s'] / naive_kph:.1f}x naive) | "
                    f"{s32['wall_s'] - s32['inside_s']:.1f} s | "
                    f"{s32.get('stage_read', 0):.1f} / {s32.get('stage_preprocess', 0):.1f} / "
                    f"{sum(v for k, v in s32.items() if k.startswith('stage_forward')):.1f} s |")
    machine = f"{_cpu_name()}, {os.cpu_count()} CPUs"
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "description": machine}  # type: ignore[dict-item]
    table = "\n".join([
        f"Machine: {machine}; best conv3d rate {min(peaks):.1f}-{max(peaks):.1f} GFLOP/s over "
        "the run; clinical knee 512x512x216 at 0.35x0.35x0.8 mm",
        "",
        "| case | s/knee | knees/h | vs naive | CPU user / sys s | peak RSS GiB | GFLOP | "
        "forward GFLOP/s (of the best conv3d rate just before and after it) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "| command | wall | rate | CPU user / sys | peak RSS |",
        "|---|---|---|---|---|",
        *cli,
        "",
        "Whole `kneebatch run` commands (fresh process: imports, cluster start, model load, "
        "every knee, gather, shutdown). 'outside' is the command's wall time not spent inside "
        "run_cohort's own clock (imports, printing, exit); read / preprocess / forward are the "
        "workers' summed stage times.",
        "",
        "| command | wall | rate | outside | read / preprocess / forward |",
        "|---|---|---|---|---|",
        *run_rows,
    ])
    print(table)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
