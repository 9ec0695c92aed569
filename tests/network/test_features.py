"""Pooling of the hooked layers: region pooling weights each position by its share of region."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kneebatch.network import features as features_module
from kneebatch.network import kernels
from kneebatch.network.features import extract_features, pool
from kneebatch.network.model import load_model


def test_crop_pooling_is_the_plain_mean() -> None:
    out = torch.arange(16, dtype=torch.float32).reshape(1, 2, 2, 2, 2)
    np.testing.assert_allclose(pool(out, None)[0].numpy(), [3.5, 11.5])


def test_region_pooling_by_hand() -> None:
    # Channel 0 holds 0..7 over a 2x2x2 grid, channel 1 the same plus 10. The region on the 4x4x4
    # input is the x < 2 half plus one voxel of the other half: each output position weighs the
    # share of its 2x2x2 input block that is region (1, or 1/8 for the one voxel).
    out = torch.stack([torch.arange(8.0), torch.arange(8.0) + 10]).reshape(1, 2, 2, 2, 2)
    region = torch.zeros(1, 1, 4, 4, 4)
    region[..., :2] = 1
    region[0, 0, 3, 3, 3] = 1  # lands in output position (1, 1, 1), value 7
    weights = {(0, 0, 0): 1, (0, 1, 0): 1, (1, 0, 0): 1, (1, 1, 0): 1, (1, 1, 1): 1 / 8}
    values = {(0, 0, 0): 0, (0, 1, 0): 2, (1, 0, 0): 4, (1, 1, 0): 6, (1, 1, 1): 7}
    expected = sum(weights[k] * values[k] for k in weights) / sum(weights.values())
    got = pool(out, region)[0].numpy()
    np.testing.assert_allclose(got, [expected, expected + 10], rtol=1e-6)


@pytest.mark.parametrize(("shape", "grid", "slab_voxels"), [
    ((23, 17, 29), (3, 2, 4), 1 << 21),  # bins of uneven, overlapping sizes
    ((23, 17, 29), (23, 17, 29), 17 * 29 * 2),  # one voxel per bin; the mask in 12 slabs
    ((9, 10, 11), (1, 1, 1), 10 * 11),  # the whole mask into one bin, a plane per slab
], ids=["uneven-bins", "identity-slabs", "one-bin"])
def test_region_weights_are_torchs_adaptive_average(
        monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int, int], grid: tuple[int, int, int],
        slab_voxels: int) -> None:
    """Issue 23: the region averaged down to a layer's grid axis by axis, the mask made float32
    a slab at a time, is ``adaptive_avg_pool3d`` of the whole mask."""
    monkeypatch.setattr(features_module, "SEPARABLE_SLAB_VOXELS", slab_voxels)
    region = torch.from_numpy(np.random.default_rng(3).random(shape) > 0.6)[None, None]
    expected = torch.nn.functional.adaptive_avg_pool3d(region.to(torch.float32), grid)
    torch.testing.assert_close(features_module.region_weight(region, grid),
                               expected.flatten(1), rtol=0, atol=1e-6)


def test_region_pooling_averages_the_region_down_once_per_hooked_layer(model_path: Path) -> None:
    network = load_model(model_path).network
    volume = np.random.default_rng(2).random((40, 36, 44), dtype=np.float32)
    region = np.zeros(volume.shape, dtype=bool)
    region[5:30, 4:30, 10:40] = True
    before = features_module.separable_weight_runs()
    extract_features(network, volume, ("denseblock2", "denseblock4"), region=region)
    assert features_module.separable_weight_runs() - before == 2


def test_region_pooling_ignores_what_lies_outside_the_region(model_path: Path) -> None:
    # Same region, different surroundings: crop pooling sees the change fully; region pooling at
    # denseblock2 only through the receptive field reaching past the region's edge (with these
    # seeded random weights: 6.4e-4 against 2.0e-3).
    network = load_model(model_path).network
    rng = np.random.default_rng(0)
    volume = np.zeros((64, 64, 64), dtype=np.float32)  # air
    region = np.zeros(volume.shape, dtype=bool)
    region[20:44, 20:44, 20:44] = True
    volume[region] = rng.uniform(0.3, 0.7, size=int(region.sum()))
    other = volume.copy()
    other[:, :, :4] = 0.6  # something bright 16 voxels from the region, inside the crop
    moved = {}
    for name, mask in (("crop", None), ("region", region)):
        a, _ = extract_features(network, volume, ("denseblock2",), region=mask)
        b, _ = extract_features(network, other, ("denseblock2",), region=mask)
        va, vb = a["denseblock2"], b["denseblock2"]
        moved[name] = 1 - float(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))
    assert moved["region"] < 0.5 * moved["crop"], moved


def test_a_region_of_the_whole_input_is_crop_pooling(model_path: Path) -> None:
    network = load_model(model_path).network
    volume = np.random.default_rng(1).random((32, 36, 40), dtype=np.float32)
    everything = np.ones(volume.shape, dtype=bool)
    layers = ("denseblock2", "denseblock3")
    crop, _ = extract_features(network, volume, layers)
    region, _ = extract_features(network, volume, layers, region=everything)
    half, _ = extract_features(network, volume, layers, region=volume > 0.5)
    for layer in layers:
        np.testing.assert_allclose(region[layer], crop[layer], rtol=1e-5, atol=1e-6)
        assert not np.allclose(half[layer], crop[layer], rtol=1e-3)


def test_an_empty_region_is_refused(model_path: Path) -> None:
    network = load_model(model_path).network
    volume = np.zeros((32, 32, 32), dtype=np.float32)
    with pytest.raises(ValueError, match="0 voxels"):
        extract_features(network, volume, ("denseblock2",), region=np.zeros(volume.shape, bool))


@pytest.mark.parametrize("layer", ["denseblock2", "denseblock3"])
def test_more_air_beyond_the_crop_face_barely_moves_a_replicate_padded_vector(
        model_path: Path, layer: str) -> None:
    # The same region cropped with 8 or 24 voxels of air around it (a 10 against a 30 mm
    # margin): zero padding shows a wall of zero activations at the near crop face, replicate
    # padding continues the air there.
    rng = np.random.default_rng(2)
    tight = np.zeros((48, 48, 48), dtype=np.float32)
    region = np.zeros(tight.shape, dtype=bool)
    region[8:40, 8:40, 8:40] = True
    tight[region] = rng.uniform(0.3, 0.7, size=int(region.sum()))
    loose, loose_region = np.pad(tight, 16), np.pad(region, 16)
    moved = {}
    for padding in ("zeros", "replicate"):
        network = load_model(model_path, conv_padding=padding).network
        a, _ = extract_features(network, tight, (layer,), region=region)
        b, _ = extract_features(network, loose, (layer,), region=loose_region)
        moved[padding] = 1 - float(a[layer] @ b[layer] / np.linalg.norm(a[layer])
                                   / np.linalg.norm(b[layer]))
    assert moved["replicate"] < 0.25 * moved["zeros"], moved


def test_conv_padding_reaches_every_convolution_but_conv0(model_path: Path) -> None:
    network = load_model(model_path, conv_padding="replicate").network
    modes = {name: m.padding_mode for name, m in network.named_modules()
             if isinstance(m, torch.nn.Conv3d) and any(m.padding)}
    assert modes.pop("conv0") == "zeros"  # air, with the ImageNet fold
    assert len(modes) == 58 and set(modes.values()) == {"replicate"}


def test_bf16_runs_in_bfloat16_and_stays_within_1e3_of_float32(
        model_path: Path, knee: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--precision bf16 (emulated where the CPU lacks it) once crashed in avg_pool3d."""
    import pandas as pd

    from kneebatch.cli.main import main
    from kneebatch.network.features import network_in
    from kneebatch.network.options import EMULATED_BF16_ENV, amx_supported

    monkeypatch.setenv(EMULATED_BF16_ENV, "1")
    network = load_model(model_path).network
    seen: list[torch.dtype] = []
    copy = network_in(network, torch.channels_last_3d, torch.bfloat16)
    handle = copy.denseblock3.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    volume = np.random.default_rng(0).normal(size=(40, 48, 48)).astype(np.float32)
    blocked = kernels.blocked_stem_calls()
    try:
        vectors, _ = extract_features(network, volume, ("denseblock3",), dtype=torch.bfloat16)
    finally:
        handle.remove()
    assert seen == [torch.bfloat16] and vectors["denseblock3"].dtype == np.float32
    # conv0 to the pool in oneDNN's blocked layout where oneDNN runs conv0's dtype (float32 on
    # AMX; bfloat16 where the CPU has it natively), else through torch's pool
    assert (kernels.blocked_stem_calls() > blocked) == (copy.conv0.weight.dtype in kernels.DTYPES)
    # conv0 (one input channel) stays float32 on AMX, where that is faster (bfloat16 elsewhere);
    # the BatchNorms torch runs keep float32 parameters
    assert copy.conv0.weight.dtype == (torch.float32 if amx_supported() else torch.bfloat16)
    assert copy.norm5.weight.dtype == torch.float32
    assert copy.denseblock3.denselayer1.conv2.weight.dtype == torch.bfloat16
    cosines = {}
    for precision in ("float32", "bf16"):
        out = tmp_path / precision
        assert main(["extract", "--ct", str(knee[0]), "--mask", str(knee[1]), "--subject-id",
                     "k", "--out", str(out), "--model", str(model_path), "--spacing", "1.5",
                     "--precision", precision]) == 0
        cosines[precision] = pd.read_csv(out / "subjects" / "k" / "similarities.csv")["cosine"]
    assert np.abs(cosines["bf16"] - cosines["float32"]).max() < 1e-3
