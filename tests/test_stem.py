"""The optimised paths give the unoptimised numbers (within 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kneebatch import features as features_module
from kneebatch.features import extract_features
from kneebatch.model import build_model
from kneebatch.stem import STEM, stem_in_slabs


@pytest.fixture(scope="module")
def network() -> torch.nn.Sequential:
    net, _ = build_model(weights="random", seed=11)
    for m in net.modules():  # non-trivial BatchNorm so the stem's norm0 matters
        if isinstance(m, torch.nn.BatchNorm3d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("depth", [9, 16, 37], ids=["d9", "d16", "d37"])
@pytest.mark.parametrize("budget", [1, 200_000, 10**9], ids=["1-row", "few-rows", "one-slab"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_stem_in_slabs_equals_the_stem(network: torch.nn.Sequential, depth: int, budget: int,
                                       channels_last: bool) -> None:
    x = torch.randn(1, 1, depth, 30, 34, generator=torch.Generator().manual_seed(depth))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        expected = x
        for name in STEM:
            expected = network.get_submodule(name)(expected)
        got = stem_in_slabs(network, x, budget_bytes=budget)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_every_optimisation_off_gives_the_same_vectors(network: torch.nn.Sequential,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features_module, "SLAB_FROM_VOXELS", 0)  # slab even this small volume
    volume = np.random.default_rng(2).normal(size=(45, 52, 48)).astype(np.float32)
    layers = ("denseblock2", "denseblock3", "denseblock4")
    from kneebatch.lean import make_lean

    make_lean(network)
    fast, _ = extract_features(network, volume, layers, channels_last=True, stem_slabs=True,
                               lean_blocks=True)
    plain, _ = extract_features(network, volume, layers, channels_last=False, stem_slabs=False,
                                lean_blocks=False)
    for layer in layers:
        np.testing.assert_allclose(fast[layer], plain[layer], rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("slab_bytes", [1, 10**9], ids=["1-row-slabs", "one-slab"])
def test_lean_dense_blocks_equal_torchvision_blocks(network: torch.nn.Sequential,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    channels_last: bool, slab_bytes: int) -> None:
    import copy

    from kneebatch import lean

    monkeypatch.setattr(lean, "SLAB_BYTES", slab_bytes)
    plain = copy.deepcopy(network)
    lean_net = lean.make_lean(copy.deepcopy(network))
    assert isinstance(lean_net.denseblock1, lean.LeanDenseBlock)
    assert isinstance(lean_net.transition1, lean.LeanTransition)
    assert lean_net.state_dict().keys() == plain.state_dict().keys()
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(1, 1, 72, 44, 36, generator=torch.Generator().manual_seed(5))
    x = x.contiguous(memory_format=fmt)
    with torch.inference_mode():
        a, b = plain.to(memory_format=fmt)(x), lean_net.to(memory_format=fmt)(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
