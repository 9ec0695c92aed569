"""The inflated network is the 2D network on depth-constant input (DESIGN.md's property)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import densenet121
from torchvision.transforms.functional import normalize

from kneebatch.config import LAYERS, ExtractionConfig
from kneebatch.network.densenet3d import densenet121_3d
from kneebatch.network.features import extract_features
from kneebatch.network.inflate import collapse_input_channels, inflate
from kneebatch.network.model import IMAGENET_MEAN, IMAGENET_STD, load_model
from kneebatch.network.options import ForwardOptions

# Largest |3D - 2D| allowed, relative to the largest |activation| of the layer (float32 rounding
# over ~120 layers; seen: about 1e-6).
REL_TOL = 1e-4


def _random_2d(seed: int, padding_mode: str = "zeros") -> nn.Sequential:
    """DenseNet121 features with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    features = densenet121(weights=None).features
    for module in features.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
        if isinstance(module, nn.Conv2d):
            module.padding_mode = padding_mode
    return features.eval()


def _layer_outputs(net: nn.Sequential, x: torch.Tensor, until: str) -> dict[str, torch.Tensor]:
    outputs = {}
    with torch.no_grad():
        for name, module in net.named_children():
            x = module(x)
            outputs[name] = x
            if name == until:
                break
    return outputs


def _inflated(net2d: nn.Sequential) -> nn.Sequential:
    net3d = inflate(copy.deepcopy(net2d))
    collapse_input_channels(net3d.conv0)  # summed kernels: a grey image on all three channels
    return net3d.eval()


def _gray(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def test_every_layer_matches_2d_on_every_slice_with_replicate_padding() -> None:
    net2d = _random_2d(0, padding_mode="replicate")
    net3d = _inflated(net2d)
    gray = _gray((64, 64), 1)
    out2d = _layer_outputs(net2d, gray.expand(1, 3, 64, 64), "norm5")
    out3d = _layer_outputs(net3d, gray.expand(1, 1, 32, 64, 64), "norm5")
    for name in LAYERS:
        a2, a3 = out2d[name], out3d[name]
        assert a3.shape[:2] == a2.shape[:2] and a3.shape[3:] == a2.shape[2:], name
        err = (a3 - a2.unsqueeze(2)).abs().max().item()
        assert err <= REL_TOL * a2.abs().max().item(), f"{name}: max abs error {err}"


def test_interior_slices_match_2d_with_zero_padding() -> None:
    # 96 slices: conv0/pool0 leave 24 depth slices; border contamination reaches slices 0-7 and
    # 17-23 after denseblock1's six 3x3x3 convolutions, so 8-16 are interior.
    net2d = _random_2d(2)
    net3d = _inflated(net2d)
    gray = _gray((64, 64), 3)
    out2d = _layer_outputs(net2d, gray.expand(1, 3, 64, 64), "denseblock1")["denseblock1"]
    out3d = _layer_outputs(net3d, gray.expand(1, 1, 96, 64, 64), "denseblock1")["denseblock1"]
    interior = out3d[:, :, 8:17]
    err = (interior - out2d.unsqueeze(2)).abs().max().item()
    assert err <= REL_TOL * out2d.abs().max().item()
    border = (out3d[:, :, 0] - out2d).abs().max().item()
    assert border > 1e-3, "border slices should feel the zero padding (test would be vacuous)"


def test_batchnorm_statistics_and_weights_are_copied() -> None:
    net2d = _random_2d(4)
    net3d = _inflated(net2d)
    bn2d = {n: m for n, m in net2d.named_modules() if isinstance(m, nn.BatchNorm2d)}
    bn3d = {n: m for n, m in net3d.named_modules() if isinstance(m, nn.BatchNorm3d)}
    assert set(bn2d) == set(bn3d) and len(bn3d) == 121
    for name, m2 in bn2d.items():
        m3 = bn3d[name]
        for attr in ("running_mean", "running_var", "weight", "bias"):
            assert torch.equal(getattr(m2, attr), getattr(m3, attr)), f"{name}.{attr}"
        assert m2.eps == m3.eps


def test_no_2d_layer_is_left() -> None:
    net3d = _inflated(_random_2d(5))
    kinds = {type(m) for m in net3d.modules()}
    assert not kinds & {nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d}
    assert net3d.conv0.weight.shape == (64, 1, 7, 7, 7)
    assert net3d.conv0.stride == (2, 2, 2) and net3d.conv0.padding == (3, 3, 3)


def test_summed_conv0_equals_gray_fed_to_all_three_channels() -> None:
    conv = _random_2d(6).conv0
    gray = _gray((32, 32), 7)[None, None]
    expected = conv(gray.expand(1, 3, 32, 32))
    collapsed = copy.deepcopy(conv)
    collapse_input_channels(collapsed)
    assert collapsed.weight.shape == (64, 1, 7, 7)
    assert torch.allclose(collapsed(gray), expected, rtol=0, atol=1e-5)


def test_imagenet_fold_equals_torchvision_normalisation_of_a_grey_image() -> None:
    # DESIGN.md: weight sum_c w_c / s_c, bias -sum_c w_c m_c / s_c, on an input in [0, 1].
    from torchvision.models import DenseNet121_Weights

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    transform = DenseNet121_Weights.IMAGENET1K_V1.transforms()  # loading needs no torchvision
    assert list(mean) == list(transform.mean) and list(std) == list(transform.std)
    conv = _random_2d(6).conv0
    grey = torch.rand((1, 1, 32, 32), generator=torch.Generator().manual_seed(7))  # in [0, 1]
    expected = conv(normalize(grey.expand(1, 3, 32, 32), list(mean), list(std)))
    folded = copy.deepcopy(conv)
    collapse_input_channels(folded, mean, std)
    assert folded.weight.shape == (64, 1, 7, 7) and folded.bias is not None
    # Positions whose 7x7 window lies inside the image (the padding is the one difference: the
    # 2D network pads with the mean colour after normalising, the folded conv0 with black/air).
    inner = (slice(None), slice(None), slice(2, 15), slice(2, 15))
    got = folded(grey)
    assert torch.allclose(got[inner], expected[inner], rtol=0, atol=1e-5)
    summed = copy.deepcopy(conv)
    collapse_input_channels(summed)
    assert not torch.allclose(summed(grey)[inner], expected[inner], atol=1e-2)


@pytest.mark.parametrize(("input_norm", "wall"), [("imagenet", False), ("grey", True)],
                         ids=["imagenet-air-padding", "seed-zero-padding"])
def test_conv0_padding_is_air_with_the_imagenet_fold(model_path: Path, input_norm: str,
                                                     wall: bool) -> None:
    # An all-air input: with the fold, conv0's zero padding is air too, so no crop face shows a
    # wall; the seed's grey normalisation pads with 0 = 347 HU, a wall at every face.
    network = load_model(model_path, input_norm).network
    air = ExtractionConfig(input_norm=input_norm).air_value
    with torch.no_grad():
        out = network.conv0(torch.full((1, 1, 16, 16, 16), air))
    border_vs_centre = (out[:, :, 0, 0, 0] - out[:, :, 4, 4, 4]).abs().max().item()
    assert (border_vs_centre > 1e-3) is wall


@pytest.mark.parametrize("depth", [3, 7], ids=["k3", "k7"])
def test_conv_kernel_is_repeated_and_divided(depth: int) -> None:
    conv = nn.Conv2d(2, 4, kernel_size=depth, padding=depth // 2)
    conv3 = inflate(nn.Sequential(conv))[0]
    assert conv3.weight.shape == (4, 2, depth, depth, depth)
    assert torch.allclose(conv3.weight.sum(dim=2), conv.weight, atol=1e-6)
    assert torch.allclose(conv3.weight[:, :, 0] * depth, conv.weight, atol=1e-6)


def test_hooked_layers_give_different_vectors() -> None:
    net3d = _inflated(_random_2d(8))
    volume = np.random.default_rng(0).normal(size=(40, 48, 48)).astype(np.float32)
    vectors, seconds = extract_features(net3d, volume, ("denseblock2", "denseblock3", "denseblock4"))
    assert {k: v.shape for k, v in vectors.items()} == {
        "denseblock2": (512,), "denseblock3": (1024,), "denseblock4": (1024,)}
    assert all(v.dtype == np.float32 for v in vectors.values())
    assert not np.allclose(vectors["denseblock3"], vectors["denseblock4"])
    assert not np.allclose(vectors["denseblock2"], vectors["denseblock3"][:512])
    assert seconds > 0


def test_channels_last_gives_the_same_vectors() -> None:
    net3d = _inflated(_random_2d(9))
    volume = np.random.default_rng(1).normal(size=(36, 40, 44)).astype(np.float32)
    layers = ("denseblock2", "norm5")
    fast, _ = extract_features(net3d, volume, layers, ForwardOptions(channels_last=True))
    plain, _ = extract_features(net3d, volume, layers, ForwardOptions(channels_last=False))
    for layer in layers:
        np.testing.assert_allclose(fast[layer], plain[layer], rtol=0, atol=1e-5)


def _settings(module: nn.Module) -> tuple[object, ...]:
    """What a layer computes, int-or-tuple settings spelled out (``inflate`` writes tuples)."""
    def t(v: object) -> object:
        return v if isinstance(v, tuple) else (v, v, v) if isinstance(v, int) else v
    if isinstance(module, nn.Conv3d):
        return ("conv", module.in_channels, module.out_channels, t(module.kernel_size),
                t(module.stride), t(module.padding), t(module.dilation), module.groups,
                module.bias is None)
    if isinstance(module, (nn.MaxPool3d, nn.AvgPool3d)):
        return (type(module).__name__, t(module.kernel_size), t(module.stride),
                t(module.padding), module.ceil_mode, t(getattr(module, "dilation", 1)),
                getattr(module, "count_include_pad", None))
    if isinstance(module, nn.BatchNorm3d):
        return ("norm", module.num_features, module.eps, module.momentum)
    return (type(module).__name__.lstrip("_"),)  # torchvision: _DenseBlock, ours: DenseBlock


def test_the_network_model_files_hold_is_torchvision_s_densenet121_inflated() -> None:
    """Issue 23: workers build ``densenet121_3d`` (no torchvision import): it must be exactly the
    inflated torchvision network, layer by layer and in its outputs."""
    theirs = inflate(_random_2d(12)).eval()
    ours = densenet121_3d().eval()
    assert [(n, _settings(m)) for n, m in ours.named_modules()][1:] == \
        [(n, _settings(m)) for n, m in theirs.named_modules()][1:]
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes
    x = torch.rand((1, 3, 33, 40, 36), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_workers_never_import_torchvision(model_path: Path) -> None:
    """Issue 23: a worker loads a model file and runs a knee without torchvision (1.3 s)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from pathlib import Path; import kneebatch.cohort.task; "
            "from kneebatch.network.cache import get_model; "
            "from kneebatch.network.features import extract_features; "
            "m = get_model(Path(sys.argv[1])); "
            "extract_features(m.network, np.ones((32, 32, 32), np.float32), ('denseblock4',)); "
            "print('torchvision' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(model_path)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False"]
