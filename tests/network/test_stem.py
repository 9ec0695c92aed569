"""The fast path (``ForwardOptions``) gives the plain path's numbers (within 1e-5), and it runs:
lean code counted, slabs forced, layouts of multi-channel activations checked. Each test builds
its own network, so no test sees another's state."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from kneebatch.network import features as features_module
from kneebatch.network import kernels, lean
from kneebatch.network import stem as stem_module
from kneebatch.network.densenet3d import DenseLayer
from kneebatch.network.features import extract_features
from kneebatch.network.model import grey_input, set_conv_padding
from kneebatch.network.options import ForwardOptions
from kneebatch.network.stem import STEM, stem_in_slabs
from kneebatch.network.weights import build_model

# Inputs are uniform in [0, 1]: the range of the network input with the ImageNet fold.
CL = torch.channels_last_3d
LAYERS = ("denseblock2", "denseblock3", "denseblock4")


@pytest.fixture
def network() -> torch.nn.Sequential:
    net, _ = build_model(weights="random", seed=11)
    grey_input(net, "imagenet")  # conv0 with a bias: the stem folds it with norm0
    for m in net.modules():  # non-trivial BatchNorm so the stem's norm0 matters
        if isinstance(m, torch.nn.BatchNorm3d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-0.5, 1.5)  # some scales negative, as trained ones can be
                m.bias.uniform_(-0.2, 0.2)
    return lean.make_lean(net.eval())


def _channels_last(t: torch.Tensor) -> bool:
    """Really channels_last: a multi-channel tensor that is not also contiguous."""
    return t.shape[1] > 1 and t.is_contiguous(memory_format=CL) and not t.is_contiguous()


@pytest.fixture
def lean_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the lean forwards that ran."""
    calls = {"block": 0, "transition": 0}
    for cls, name in ((lean.LeanDenseBlock, "block"), (lean.LeanTransition, "transition")):
        original = cls.lean

        def counted(self: torch.nn.Module, x: torch.Tensor, _o=original, _n=name) -> torch.Tensor:  # type: ignore[no-untyped-def]
            calls[_n] += 1
            return _o(self, x)

        monkeypatch.setattr(cls, "lean", counted)
    return calls


@pytest.mark.parametrize("depth", [9, 16, 37], ids=["d9", "d16", "d37"])
@pytest.mark.parametrize("budget", [1, 200_000, 10**9], ids=["1-row", "few-rows", "one-slab"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("onednn", [False, True], ids=["torch-pool", "onednn-blocked"])
def test_stem_in_slabs_equals_the_stem(network: torch.nn.Sequential, depth: int, budget: int,
                                       channels_last: bool, onednn: bool) -> None:
    x = torch.rand(1, 1, depth, 30, 34, generator=torch.Generator().manual_seed(depth))
    fmt = CL if channels_last else torch.contiguous_format
    with torch.inference_mode():
        expected = x
        for name in STEM:
            expected = network.get_submodule(name)(expected)
        before = kernels.blocked_stem_calls()
        with kernels.onednn_forward(onednn):
            got = stem_in_slabs(network, x, budget_bytes=budget, memory_format=fmt)
    assert got.shape == expected.shape
    # oneDNN's blocked layout from conv0 to the pool, once per slab, where oneDNN is on
    slabs = {1: expected.shape[2], 10**9: 1}.get(budget)
    calls = kernels.blocked_stem_calls() - before
    assert calls == (0 if not onednn else slabs or calls)
    assert not onednn or 1 <= calls <= expected.shape[2]
    assert _channels_last(got) == channels_last  # 64 channels: the layout asked for
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * scale)


def _activations(network: torch.nn.Module, names: tuple[str, ...]) -> tuple[dict[str, bool], list]:  # type: ignore[type-arg]
    seen: dict[str, bool] = {}
    handles = [network.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: seen.__setitem__(n, _channels_last(out))) for n in names]
    return seen, handles


@pytest.mark.parametrize("slab_bytes", [4096, 10**9], ids=["many-slabs", "one-slab"])
def test_the_fast_path_runs_and_gives_the_plain_numbers(
        network: torch.nn.Sequential, monkeypatch: pytest.MonkeyPatch,
        lean_calls: dict[str, int], slab_bytes: int) -> None:
    monkeypatch.setattr(stem_module, "SLAB_BYTES", 200_000)  # slab even this small volume
    monkeypatch.setattr(lean, "SLAB_BYTES", slab_bytes)
    volume = np.random.default_rng(2).random(size=(45, 52, 48)).astype(np.float32)
    fast_net = features_module.network_in(network, CL)
    seen, handles = _activations(fast_net, ("denseblock1", "transition1", "denseblock3"))
    blocked = kernels.blocked_stem_calls()
    fast, _ = extract_features(network, volume, LAYERS, ForwardOptions())
    for h in handles:
        h.remove()
    assert kernels.blocked_stem_calls() > blocked  # the stem in oneDNN's layout
    assert seen == {"denseblock1": True, "transition1": True, "denseblock3": True}
    assert lean_calls == {"block": 4, "transition": 3}  # denseblock1-4, transition1-3
    plain_net = features_module.network_in(network, torch.contiguous_format)
    seen, handles = _activations(plain_net, ("denseblock1", "transition1"))
    plain, _ = extract_features(network, volume, LAYERS, ForwardOptions.plain())
    for h in handles:
        h.remove()
    assert seen == {"denseblock1": False, "transition1": False}
    assert lean_calls == {"block": 4, "transition": 3}  # the plain path ran no lean code
    for layer in LAYERS:
        np.testing.assert_allclose(fast[layer], plain[layer], rtol=0, atol=1e-5)


def _scales_of_every_sign(norm: torch.nn.BatchNorm3d) -> int:
    """Give ``norm`` scales positive, negative, zero and too small for any input to cross the
    ReLU's cut, and shifts from -1 to 1 (in place); returns its channels."""
    channels = norm.num_features
    with torch.no_grad():
        gamma = torch.tensor([1.0, -1.0, 0.0, 1e-38, -1e-38, 0.3, -2.0, 5.0])
        norm.weight.copy_(gamma.repeat(channels // 8))
        norm.bias.copy_(torch.linspace(-1, 1, channels))
    return channels


def test_a_dense_layers_norm1_and_relu1_are_one_clamp_before_its_folded_conv1(
        network: torch.nn.Sequential) -> None:
    """relu(norm1(x)) into conv1 and norm2 is clamp(x, low, high) into one convolution, whatever
    the sign of norm1's scale: positive, negative, zero, or too small for any input to cross the
    ReLU's cut."""
    layer = network.denseblock1.denselayer2
    channels = _scales_of_every_sign(layer.norm1)
    lean.keep_bottleneck_fold(layer)
    x = torch.randn(1, channels, 5, 6, 7, generator=torch.Generator().manual_seed(3)) * 3
    with torch.inference_mode():
        expected = layer.relu2(layer.norm2(layer.conv1(layer.relu1(layer.norm1(x)))))
        weight, bias, low, high = lean.bottleneck_fold(layer)
        got = torch.nn.functional.conv3d(torch.clamp(x, low, high), weight, bias).relu_()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * expected.abs().max().item())


def test_a_transitions_norm_and_relu_are_one_clamp_before_its_folded_conv(
        network: torch.nn.Sequential) -> None:
    """Issue 23: a transition's norm and relu as one clamp, their scale and shift folded into its
    1x1x1 convolution (one pass over its input instead of two), whatever the sign of the norm's
    scale; the lean forward ran it and gives the plain forward's numbers."""
    transition = copy.deepcopy(network.transition1)
    channels = _scales_of_every_sign(transition.norm)
    lean.keep_bottleneck_fold(transition)
    x = torch.randn(1, channels, 6, 7, 8, generator=torch.Generator().manual_seed(5)) * 3
    before = lean.clamped_transition_runs()
    with torch.inference_mode(), lean.lean_forward(True, torch.contiguous_format):
        got = transition(x)
        expected = transition.pool(transition.conv(transition.relu(transition.norm(x.clone()))))
    assert lean.clamped_transition_runs() - before == 1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * expected.abs().max().item())
    volume = np.random.default_rng(8).random(size=(34, 36, 38)).astype(np.float32)
    before = lean.clamped_transition_runs()
    fast, _ = extract_features(network, volume, LAYERS, ForwardOptions())
    assert lean.clamped_transition_runs() - before == 3  # every transition of the loaded model
    plain, _ = extract_features(network, volume, LAYERS, ForwardOptions.plain())
    assert lean.clamped_transition_runs() - before == 3  # the plain path: torch's norm and relu
    for layer in LAYERS:
        np.testing.assert_allclose(fast[layer], plain[layer], rtol=0, atol=1e-5)


def test_batchnorm_is_folded_once_at_load_not_in_every_forward(network: torch.nn.Sequential) -> None:
    folds = lean.folds_computed()
    volume = np.random.default_rng(4).random(size=(34, 36, 38)).astype(np.float32)
    for _ in range(2):
        extract_features(network, volume, LAYERS, ForwardOptions())
    assert lean.folds_computed() == folds  # the fast path used the folds make_lean made
    assert hasattr(network.norm0, "folded_weight")
    assert not any("folded" in key for key in network.state_dict())  # model files unchanged


def test_the_cached_model_is_never_changed_by_a_forward(network: torch.nn.Sequential) -> None:
    network = network.to(memory_format=CL)
    before = {k: (v.clone(), v.stride()) for k, v in network.state_dict().items()}
    volume = np.random.default_rng(3).random(size=(34, 36, 38)).astype(np.float32)
    extract_features(network, volume, ("denseblock2",), ForwardOptions.plain())
    extract_features(network, volume, ("denseblock2",), ForwardOptions(channels_last=False))
    after = network.state_dict()
    assert all(torch.equal(after[k], v) and after[k].stride() == s for k, (v, s) in before.items())


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("slab_bytes", [1, 10**9], ids=["1-row-slabs", "one-slab"])
def test_lean_dense_blocks_equal_torchvision_blocks(network: torch.nn.Sequential,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    lean_calls: dict[str, int],
                                                    channels_last: bool, slab_bytes: int) -> None:
    monkeypatch.setattr(lean, "SLAB_BYTES", slab_bytes)
    assert isinstance(network.denseblock1, lean.LeanDenseBlock)
    assert isinstance(network.transition1, lean.LeanTransition)
    fmt = CL if channels_last else torch.contiguous_format
    net = copy.deepcopy(network).to(memory_format=fmt)
    x = torch.rand(1, 1, 72, 44, 36, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        with lean.lean_forward(False):
            a = net(x)
        assert lean_calls == {"block": 0, "transition": 0}
        with lean.lean_forward(True):
            b = net(x)
    assert lean_calls == {"block": 4, "transition": 3}
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(1.0, a.abs().max().item()))


def test_every_float32_convolution_goes_through_onednn_with_the_same_numbers(
        network: torch.nn.Sequential) -> None:
    from kneebatch.network import kernels

    if not kernels.AVAILABLE:
        pytest.skip("this torch has no oneDNN")
    convolutions = sum(isinstance(m, torch.nn.Conv3d) for m in network.modules())
    volume = np.random.default_rng(5).random(size=(34, 36, 38)).astype(np.float32)
    before = kernels.onednn_calls()
    fast, _ = extract_features(network, volume, LAYERS, ForwardOptions())
    ran = kernels.onednn_calls() - before
    assert ran >= convolutions - 1  # every convolution up to denseblock4 (norm5 has none)
    other, _ = extract_features(network, volume, LAYERS, ForwardOptions(onednn=False))
    assert kernels.onednn_calls() - before == ran  # switched off: torch's own kernels
    for layer in LAYERS:
        np.testing.assert_allclose(fast[layer], other[layer], rtol=0, atol=1e-5)


def test_transitions_pool_before_their_convolution_with_the_same_numbers(
        network: torch.nn.Sequential) -> None:
    """Issue 23: a 1x1x1 convolution and a 2x2x2 average pool commute; pooling first does an
    eighth of the convolution's work. Odd sizes check the dropped last rows."""
    volume = np.random.default_rng(6).random(size=(67, 45, 71)).astype(np.float32)
    before = lean.pool_first_runs()
    fast, _ = extract_features(network, volume, LAYERS, ForwardOptions())
    assert lean.pool_first_runs() - before == 3  # every transition, pool first
    conv_first, _ = extract_features(network, volume, LAYERS, ForwardOptions(pool_first=False))
    plain, _ = extract_features(network, volume, LAYERS, ForwardOptions.plain())
    assert lean.pool_first_runs() - before == 3  # switched off: conv first, as torchvision
    for layer in LAYERS:
        np.testing.assert_allclose(fast[layer], conv_first[layer], rtol=0, atol=1e-5)
        np.testing.assert_allclose(fast[layer], plain[layer], rtol=0, atol=1e-5)
    x = torch.rand(2, 8, 7, 6, 5).contiguous(memory_format=CL)
    torch.testing.assert_close(lean.average_pool2(x.clone()),
                               torch.nn.functional.avg_pool3d(x, 2), rtol=0, atol=1e-6)


def test_the_relu_after_a_convolution_is_fused_into_it_with_the_same_numbers(
        network: torch.nn.Sequential) -> None:
    """Issue 23: each dense layer's conv1 (norm2 folded in) and its relu2 are one oneDNN call."""
    from kneebatch.network import kernels

    if not kernels.AVAILABLE:
        pytest.skip("this torch has no oneDNN")
    volume = np.random.default_rng(7).random(size=(34, 36, 38)).astype(np.float32)
    before = kernels.fused_relu_calls()
    fast, _ = extract_features(network, volume, LAYERS, ForwardOptions())
    dense_layers = sum(isinstance(m, DenseLayer) for m in network.modules())
    assert dense_layers == 58  # 6 + 12 + 24 + 16
    assert kernels.fused_relu_calls() - before >= dense_layers  # one or more slabs each
    other, _ = extract_features(network, volume, LAYERS, ForwardOptions(onednn=False))
    for layer in LAYERS:
        np.testing.assert_allclose(fast[layer], other[layer], rtol=0, atol=1e-5)


@pytest.mark.parametrize("padding", ["zeros", "replicate"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("slab_bytes", [1, 300_000], ids=["1-row-slabs", "few-row-slabs"])
def test_dense_layers_in_depth_slabs_give_the_whole_tensors_numbers(
        network: torch.nn.Sequential, monkeypatch: pytest.MonkeyPatch, padding: str,
        channels_last: bool, slab_bytes: int) -> None:
    """A native-resolution knee's bottleneck (128 channels at a quarter of the input) is never
    whole: each 3x3x3 conv2 reads its slab's bottleneck rows plus the rows beyond it, carried
    from the slab before; the volume's first and last rows padded as conv2 pads."""
    set_conv_padding(network, padding)  # type: ignore[arg-type]
    fmt = CL if channels_last else torch.contiguous_format
    net = copy.deepcopy(network).to(memory_format=fmt)
    x = torch.rand(1, 1, 61, 40, 36, generator=torch.Generator().manual_seed(8))
    monkeypatch.setattr(lean, "SLAB_BYTES", slab_bytes)
    pads: list[str] = []  # padded copies made by torch (the lean blocks write conv2's halo)
    original_pad = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, "pad", lambda *a, **k: (
        pads.append(k.get("mode", "constant")), original_pad(*a, **k))[1])
    with torch.inference_mode():
        with lean.lean_forward(False):
            plain = net(x)
        assert pads.count("replicate") == (58 if padding == "replicate" else 0)
        pads.clear()
        before = lean.conv2_slab_runs()
        with lean.lean_forward(True, fmt):
            whole = net(x)
        assert lean.conv2_slab_runs() == before  # small: every bottleneck whole
        monkeypatch.setattr(lean, "CONV2_SLABS_FROM_BYTES", 0)
        with lean.lean_forward(True, fmt):
            slabbed = net(x)
    assert lean.conv2_slab_runs() - before == 4  # every block, in slabs
    assert "replicate" not in pads  # conv2's padding written in place, both ways
    scale = max(1.0, plain.abs().max().item())
    torch.testing.assert_close(slabbed, plain, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(slabbed, whole, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_the_first_dense_block_grows_the_stems_output_in_place(
        network: torch.nn.Sequential, channels_last: bool) -> None:
    """The stem's output comes with room for denseblock1's channels: the block writes its layers
    into it instead of a second buffer of its own (a native knee: 0.2 GB less at the peak)."""
    fmt = CL if channels_last else torch.contiguous_format
    net = copy.deepcopy(network).to(memory_format=fmt)
    x = torch.rand(1, 1, 40, 34, 30, generator=torch.Generator().manual_seed(9))
    total = lean.block_channels(net.denseblock1)
    assert total == 256
    with torch.inference_mode(), lean.lean_forward(True, fmt):
        stem = stem_in_slabs(net, x, budget_bytes=200_000, memory_format=fmt, channels=total)
        assert stem.shape[1] == 64
        assert stem.untyped_storage().nbytes() == 4 * stem.numel() * total // 64
        expected = net.denseblock1(stem.clone(memory_format=fmt))
        grown = net.denseblock1(stem)
        assert grown.data_ptr() == stem.data_ptr()  # the same memory, no copy
        plain = stem_in_slabs(net, x, budget_bytes=200_000, memory_format=fmt)
        assert plain.untyped_storage().nbytes() == 4 * plain.numel()
        assert net.denseblock1(plain).data_ptr() != plain.data_ptr()
    torch.testing.assert_close(grown, expected, rtol=0, atol=0)


def test_an_input_handed_over_in_a_list_is_freed_before_the_first_block(
        network: torch.nn.Sequential, monkeypatch: pytest.MonkeyPatch) -> None:
    """A native knee's region (0.2 GB) is not held while the first block's buffer exists: the
    caller hands it over, and the vectors are those of the same array passed as it is."""
    import weakref

    monkeypatch.setattr(stem_module, "SLAB_BYTES", 200_000)  # the stem in slabs, as at native
    volume = np.random.default_rng(10).random(size=(40, 36, 38)).astype(np.float32)
    expected, _ = extract_features(network, volume, LAYERS, ForwardOptions())
    held = [volume.copy()]
    alive = weakref.ref(held[0])
    seen = []
    hook = features_module.network_in(network, CL).denseblock1.register_forward_pre_hook(
        lambda _m, _i: seen.append(alive() is not None))
    try:
        got, _ = extract_features(network, held, LAYERS, ForwardOptions())
    finally:
        hook.remove()
    assert held == [] and seen == [False]  # emptied, and gone when denseblock1 started
    for layer in LAYERS:
        np.testing.assert_array_equal(got[layer], expected[layer])
