"""Validity: do the vectors describe the region, or the crop's air? Measured, per layer and pooling.

    python benchmarks/validity.py                                  # sample cohort, random weights
    python benchmarks/validity.py --manifest cohort.csv --model model3d_state_dict.pth  # yours

For each knee, each hooked layer, both poolings (``region``, the default, and ``crop``) and both
paddings of the convolutions after conv0 (``replicate``, the default, and torchvision's ``zeros``):
- margin effect: 1 - cos between a region's vector with the crop margin at 10 mm and at 30 mm (a
  setting nobody reports should not move the result; target for denseblock2 with the defaults:
  <= 1e-3);
- air fraction: the share of the pooling weight on voxels outside the region (crop pooling: the
  share of the input that is not region; region pooling: the region mask averaged down to the
  layer's grid gives weights w, and the air is sum w (1 - w) / sum w);
- distances: 1 - cos of tibia-femur, tibia-background, femur-background within a knee;
- the cohort null: the mean cosine of the same region across knees against the mean cosine of
  different regions within a knee. Vectors that describe anatomy are closer across knees for the
  same bone than across bones within a knee.
Every other setting is the default. Writes a JSON and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

MARGINS_MM = (10.0, 30.0)
VARIANTS = (("region", "replicate"), ("crop", "replicate"), ("region", "zeros"), ("crop", "zeros"))
REGIONS = ("tibia", "femur", "background")


def _layer_grid(shape: tuple[int, ...], layer: str) -> tuple[int, ...]:
    """The (z, y, x) grid of a DenseNet121 block's output for an input of ``shape``: conv0 and
    pool0 halve (rounding up), each transition halves (rounding down)."""
    grid = tuple(math.ceil(math.ceil(n / 2) / 2) for n in shape)
    for _ in range(int(layer[-1]) - 1):
        grid = tuple(n // 2 for n in grid)
    return grid


def _air_fraction(members: np.ndarray, layer: str, pooling: str) -> float:
    import torch
    import torch.nn.functional as F

    if pooling == "crop":
        return 1.0 - float(members.mean())
    region = torch.from_numpy(members.astype(np.float32))[None, None]
    w = F.adaptive_avg_pool3d(region, _layer_grid(members.shape, layer)).flatten()
    return float((w * (1 - w)).sum() / w.sum())


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def measure(manifest: Path, model: Path) -> dict[str, object]:
    """Vectors of every knee under each (pooling, margin), and the measures of the docstring."""
    from kneebatch.config import ExtractionConfig
    from kneebatch.inputs.manifest import read_manifest
    from kneebatch.network.cache import get_model
    from kneebatch.network.features import extract_features
    from kneebatch.scan.read import load_scan
    from kneebatch.scan.regions import make_regions

    base = ExtractionConfig()
    specs = read_manifest(manifest)
    vectors: dict[tuple[str, str, float], list[dict[str, dict[str, np.ndarray]]]] = {}
    air: dict[tuple[str, str, str], list[float]] = {}
    for spec in specs:
        print(f"  {spec.subject_id}", file=sys.stderr)
        scan = load_scan(spec, base)
        for (pooling, padding), margin in itertools.product(VARIANTS, MARGINS_MM):
            config = dataclasses.replace(base, pooling=pooling, conv_padding=padding,
                                         margin_mm=margin)
            loaded = get_model(model, config.input_norm, config.conv_padding)
            regions = make_regions(scan, config)
            knee = {}
            for name in REGIONS:
                volume, members = regions.region(name)
                knee[name], _ = extract_features(loaded.network, volume, config.layers,
                                                 region=members if pooling == "region" else None)
                if margin == MARGINS_MM[0] and padding == "replicate":  # same for either padding
                    for layer in config.layers:
                        air.setdefault((pooling, layer, name), []).append(
                            _air_fraction(members, layer, pooling))
            vectors.setdefault((pooling, padding, margin), []).append(knee)
    rows = []
    for (pooling, padding), layer in itertools.product(VARIANTS, base.layers):
        near = vectors[(pooling, padding, MARGINS_MM[0])]
        far = vectors[(pooling, padding, MARGINS_MM[1])]
        row: dict[str, object] = {"pooling": pooling, "conv_padding": padding, "layer": layer}
        for name in REGIONS:
            row[f"margin_{name}"] = float(np.mean([_distance(a[name][layer], b[name][layer])
                                                   for a, b in zip(near, far, strict=True)]))
            row[f"air_{name}"] = float(np.mean(air[(pooling, layer, name)]))
        for a, b in itertools.combinations(REGIONS, 2):
            row[f"dist_{a}_{b}"] = float(np.mean([_distance(k[a][layer], k[b][layer])
                                                  for k in near]))
        within = [1 - _distance(k[a][layer], k[b][layer]) for k in near
                  for a, b in itertools.combinations(REGIONS, 2)]
        across = [1 - _distance(i[r][layer], j[r][layer]) for i, j in itertools.combinations(near, 2)
                  for r in REGIONS]
        row["cos_within_knee_cross_region"] = float(np.mean(within))
        row["cos_across_knees_same_region"] = float(np.mean(across)) if across else float("nan")
        rows.append(row)
    loaded = get_model(model, base.input_norm, base.conv_padding)
    return {"manifest": str(manifest), "model_weights": loaded.info.weights,
            "model_sha256": loaded.info.sha256, "knees": len(specs),
            "settings": base.to_dict(), "rows": rows}


def table(results: dict[str, object]) -> str:
    """Markdown tables of ``measure``'s rows."""
    rows = results["rows"]
    assert isinstance(rows, list)
    lines = [f"{results['knees']} knees, weights {results['model_weights']}; 1 - cos unless "
             "stated; margin = 10 mm against 30 mm.", "",
             "| pooling | conv padding | layer | margin effect tibia / femur / background | air fraction "
             "tibia / femur / background | tibia-femur | tibia-bg | femur-bg | cos same region "
             "across knees | cos other region within knee |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['pooling']} | {r['conv_padding']} | {r['layer']} | "
            + " / ".join(f"{r[f'margin_{n}']:.1e}" for n in REGIONS) + " | "
            + " / ".join(f"{r[f'air_{n}']:.2f}" for n in REGIONS) + " | "
            + " | ".join(f"{r[k]:.1e}" for k in ("dist_tibia_femur", "dist_tibia_background",
                                                 "dist_femur_background"))
            + f" | {r['cos_across_knees_same_region']:.4f} | "
              f"{r['cos_within_knee_cross_region']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, help="default: a fresh sample cohort")
    parser.add_argument("--model", type=Path, help="default: seeded random weights")
    parser.add_argument("--subjects", type=int, default=4, help="sample cohort size")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("validity.json"))
    args = parser.parse_args()
    from kneebatch.inputs.phantom import write_sample
    from kneebatch.network.modelfile import save_model
    from kneebatch.network.weights import build_model

    with tempfile.TemporaryDirectory() as tmp:
        manifest = args.manifest or write_sample(Path(tmp) / "sample", args.subjects)
        model = args.model
        if model is None:
            model = Path(tmp) / "model.pth"
            save_model(*build_model(weights="random", seed=0), model)
        results = measure(manifest, model)
    text = table(results)
    print(text)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
