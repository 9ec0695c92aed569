"""Gather benchmark: `kneebatch gather` over many finished subjects, as a fresh process.

    python benchmarks/gather.py [--subjects 10000] [--out DIR]

The subjects are made cheaply: result files of the real size and layout (nine vectors of the default
layers, nine similarity rows, a done.json) written by ``make_finished_out``, the same writer a run
uses, with the keys and settings records a run leaves. Prints the wall time and peak RSS of the
gather and writes them to ``benchmarks/gather.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_finished_out(out: Path, subjects: int, seed: int = 0) -> None:
    """An OUT holding ``subjects`` finished subjects and the records of the run that made them."""
    from kneebatch.config import DEFAULT_LAYERS, ExtractionConfig
    from kneebatch.extract.similarity import similarities
    from kneebatch.outdir.folder import check_settings, claim_out, save_manifest
    from kneebatch.outdir.records import DoneRecord, ManifestRecord, RegionRecord, SettingsRecord
    from kneebatch.results.subject_files import write_subject

    config = ExtractionConfig()
    claim_out(out)
    check_settings(out, SettingsRecord(config.hash(), "0" * 64, "random:seed=0", config.to_dict()),
                   overwrite=False)
    rng = np.random.default_rng(seed)
    dims = {"denseblock2": 512, "denseblock3": 1024, "denseblock4": 1024}
    keys = {}
    for i in range(subjects):
        sid = f"s{i:05d}"
        vectors = {region: {layer: rng.random(dims[layer], dtype=np.float32) for layer in DEFAULT_LAYERS}
                   for region in ("tibia", "femur", "background")}
        keys[sid] = f"{i:032x}"
        done = DoneRecord(subject_id=sid, key=keys[sid], config_hash=config.hash(),
                          model_sha256="0" * 64, weights="random:seed=0", run_id="bench",
                          config=config.to_dict(), extra={"site": "AB"[i % 2]}, side="R",
                          regions=dict.fromkeys(("tibia", "femur", "background"),
                                                RegionRecord(1000, 1.0, *[100.0] * 7)))
        write_subject(out, sid, vectors, similarities(sid, vectors, DEFAULT_LAYERS), done,
                      time.perf_counter())
    save_manifest(out, ManifestRecord(keys))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=None, help="keep the OUT here (default: temp)")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("gather.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "out"
        start = time.perf_counter()
        make_finished_out(out, args.subjects)
        made_s = time.perf_counter() - start
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "kneebatch", "gather", str(out)],
                              capture_output=True, text=True)
        wall_s = time.perf_counter() - start
        if done.returncode != 0:
            print(done.stdout, done.stderr, file=sys.stderr)
            return 1
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        result = {"subjects": args.subjects, "gather_wall_s": round(wall_s, 1),
                  "gather_peak_rss_gib": round(peak_gib, 2), "make_s": round(made_s, 1)}
    print(f"gather of {args.subjects} finished subjects (fresh process): {wall_s:.1f} s, "
          f"peak RSS {peak_gib:.2f} GiB (made in {made_s:.0f} s)")
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
