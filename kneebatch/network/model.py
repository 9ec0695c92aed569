"""Model stage, part 2: build, save and load the inflated DenseNet121 (its ``features`` part).

``build_model`` makes the 3D network from ImageNet weights (torchvision's download and cache), a local
torchvision ``.pth`` or seeded random weights. ``save_model`` writes its state dict and a sidecar JSON
(sha256, weights source, versions); compute nodes only ever ``load_model`` that file, with
``weights_only=True`` and the sha256 checked. ``get_model`` caches one copy per process.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import threading
import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import DenseNet121_Weights, densenet121

from kneebatch import __version__
from kneebatch.errors import WeightsError
from kneebatch.network.checkpoints import (
    checkpoint_kind,
    is_published_imagenet,
    published_imagenet_prefix,
    state_kind,
)
from kneebatch.network.inflate import collapse_input_channels, inflate
from kneebatch.network.lean import make_lean

log = logging.getLogger(__name__)

# The file holds the inflated network with conv0's three colour channels; each load collapses conv0
# to one grey channel the way the extraction settings ask (``input_norm``). Files of the older
# "densenet121-inflated-3d-1ch" (conv0 summed when built) cannot do the exact ImageNet fold.
ARCHITECTURE = "densenet121-inflated-3d"
# Old torchvision checkpoints name DenseNet's layers "norm.1"; torchvision renames them on load, and
# so must we for a .pth given by path.
_OLD_KEYS = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What produced a model file: recorded in every output."""

    sha256: str
    weights: str
    torch: str
    torchvision: str
    kneebatch: str
    architecture: str = ARCHITECTURE


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """The 3D network (``densenet121().features``, inflated, eval mode) and its provenance."""

    network: nn.Sequential
    info: ModelInfo
    # One forward pass at a time in a process: a worker reads and preprocesses its next subject
    # while the current one runs through the network, but never holds two forwards' activations.
    forward_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock,
                                                     compare=False, repr=False)


def _conv0(features: nn.Sequential) -> nn.Conv3d:
    conv0 = features.conv0
    assert isinstance(conv0, nn.Conv3d)  # inflate() made it so
    return conv0


def _architecture() -> nn.Sequential:
    """The 3D network with untouched (random) weights; its state dict is what model files hold."""
    with torch.random.fork_rng(devices=[]):
        features = densenet121(weights=None).features
        inflate(features)
    return features.eval()


def imagenet_mean_std() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's per-channel mean and std, as torchvision's DenseNet121 weights normalise."""
    transform = DenseNet121_Weights.IMAGENET1K_V1.transforms()
    return tuple(transform.mean), tuple(transform.std)


def grey_input(features: nn.Sequential, input_norm: str) -> nn.Sequential:
    """Collapse conv0 of an inflated network to one grey channel (in place; see
    ``collapse_input_channels``): ``imagenet`` folds ImageNet's per-channel normalisation in
    exactly (input in [0, 1]), ``grey`` sums the kernels (input normalised with one grey mean/std).
    """
    if input_norm == "imagenet":
        mean, std = imagenet_mean_std()
        collapse_input_channels(_conv0(features), mean, std)
    else:
        collapse_input_channels(_conv0(features))
    return features


def _rename_old_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        match = _OLD_KEYS.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def _load_2d(weights: str, seed: int) -> tuple[nn.Module, str]:
    if weights == "imagenet":
        try:
            return densenet121(weights=DenseNet121_Weights.IMAGENET1K_V1), "imagenet:IMAGENET1K_V1"
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            raise WeightsError(
                "Could not download torchvision's ImageNet DenseNet121 weights "
                f"({type(exc).__name__}: {exc}). This machine seems to have no internet. Either "
                "build the model on a machine with internet (`kneebatch build-model --weights "
                "imagenet --out model3d_state_dict.pth`) and copy the .pth and its .json here, or "
                "pass a downloaded torchvision checkpoint: `--weights /path/densenet121-a639ec97.pth`"
                f" (torchvision's cache is {torch.hub.get_dir()}/checkpoints)."
            ) from exc
    if weights == "random":
        torch.manual_seed(seed)  # build_model runs this inside fork_rng
        return densenet121(weights=None), f"random:seed={seed}"
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(
            f"--weights {weights!r} is neither 'imagenet', 'random' nor an existing file. "
            "Give the path of a torchvision DenseNet121 checkpoint (.pth)."
        )
    net = densenet121(weights=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state_kind(state) == "3d":
            raise WeightsError(
                f"{path} is already a kneebatch 3D model file, not a torchvision 2D checkpoint: "
                f"use it as it is, `--model {path}` (build-model --weights takes torchvision's "
                "densenet121-*.pth).")
        net.load_state_dict(_rename_old_keys(state))
    except WeightsError:
        raise
    except Exception as exc:  # torch raises many types for a bad checkpoint
        raise WeightsError(
            f"Could not load DenseNet121 weights from {path}: {str(exc)[:300]}. Expected a torchvision "
            "densenet121 state dict such as torchvision's densenet121-a639ec97.pth."
        ) from exc
    sha256 = file_sha256(path)
    if is_published_imagenet(sha256):
        return net, "imagenet:IMAGENET1K_V1"  # the very file torchvision downloads
    log.warning("%s is not torchvision's published ImageNet DenseNet121 file (sha256 %s..., "
                "expected %s...): recorded as a file of its own, not as 'imagenet'", path,
                sha256[:8], published_imagenet_prefix())
    return net, f"file:{path.name}:sha256={sha256[:16]}"


def build_model(*, weights: str = "imagenet", seed: int = 0) -> tuple[nn.Sequential, str]:
    """Build the inflated 3D network.

    Args:
        weights: ``imagenet`` (torchvision's standard download/cache), ``random`` (seeded; for
            tests and offline demos only) or the path of a torchvision densenet121 ``.pth``.
        seed: seed of the random weights.

    Returns:
        The network (eval mode, conv0 still with three colour channels: ``grey_input`` makes it
        take CT) and a string naming the weights that produced it.

    Raises:
        WeightsError: the weights cannot be downloaded or loaded.
    """
    # Building layers draws random initial weights; keep the caller's random stream untouched.
    with torch.random.fork_rng(devices=[]):
        net2d, source = _load_2d(weights, seed)
        features = net2d.features
        assert isinstance(features, nn.Sequential)  # torchvision's DenseNet layout
        inflate(features)
    return features.eval(), source


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(path: Path) -> Path:
    """The JSON beside a model file."""
    return path.with_suffix(".json")


def save_model(network: nn.Module, weights_source: str, path: Path) -> ModelInfo:
    """Write the state dict and its sidecar JSON (each to a temporary name, then renamed).

    Returns:
        The provenance written to the sidecar.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(network.state_dict(), tmp)
    info = ModelInfo(
        sha256=file_sha256(tmp),
        weights=weights_source,
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        kneebatch=__version__,
    )
    side = sidecar_path(path)
    side_tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    side_tmp.write_text(json.dumps(dataclasses.asdict(info), indent=2) + "\n")
    os.replace(tmp, path)
    os.replace(side_tmp, side)
    return info


def read_model_info(path: Path) -> ModelInfo:
    """The sidecar of a model file, checked against the file's sha256.

    Raises:
        WeightsError: the file or sidecar is missing, or the sha256 does not match.
    """
    side = sidecar_path(path)
    if path.is_file() and not side.is_file() and checkpoint_kind(path) == "2d":
        raise WeightsError(
            f"{path} is a torchvision 2D checkpoint, not a kneebatch model: build it first: "
            f"kneebatch build-model --weights {path} --out model3d_state_dict.pth (then pass "
            "--model model3d_state_dict.pth).")
    if not path.is_file():
        raise WeightsError(
            f"Model file {path} does not exist. Build it once with `kneebatch build-model --out "
            f"{path}` (or set $KNEEBATCH_MODEL / --model to where it is)."
        )
    try:
        info = ModelInfo(**json.loads(side.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise WeightsError(
            f"Model sidecar {side} is missing or unreadable ({exc}). Rebuild the model with "
            f"`kneebatch build-model --out {path}`; it writes both files."
        ) from exc
    actual = file_sha256(path)
    if actual != info.sha256:
        raise WeightsError(
            f"Model file {path} has sha256 {actual[:16]}..., but its sidecar {side.name} says "
            f"{info.sha256[:16]}...: the file was changed or partly copied. Copy it again or "
            "rebuild it with `kneebatch build-model`."
        )
    return info


def _not_ours(path: Path, why: str) -> WeightsError:
    return WeightsError(
        f"Model file {path} is not a kneebatch {ARCHITECTURE} state dict ({why}). A torchvision "
        "2D checkpoint must be inflated first: `kneebatch build-model --weights FILE --out "
        "model3d_state_dict.pth`.")


def _our_model_info(path: Path) -> ModelInfo:
    info = read_model_info(path)
    if info.architecture != ARCHITECTURE:
        raise WeightsError(
            f"Model file {path} was built by an older kneebatch (layout {info.architecture!r}, "
            f"this one needs {ARCHITECTURE!r}: conv0 keeps its three colour channels so ImageNet's "
            f"normalisation can be folded in exactly). Rebuild it once: `kneebatch build-model "
            f"--weights {info.weights.split(':')[0]} --out {path}`.")
    return info


def check_model_file(path: Path) -> ModelInfo:
    """Check a model file before any compute: sidecar, sha256, and the tensors it holds (names
    and shapes of the 3D network's state dict; memory-mapped, nothing is loaded).

    Raises:
        WeightsError: the file is missing, changed, or not a kneebatch model.
    """
    info = _our_model_info(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise _not_ours(path, str(exc)[:300]) from exc
    expected = {k: tuple(v.shape) for k, v in _architecture().state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        odd = sorted(k for k in found if expected.get(k) != found[k])[:3]
        raise _not_ours(path, f"missing {missing or 'nothing'}, unexpected or reshaped "
                              f"{odd or 'nothing'}")
    return info


def set_conv_padding(features: nn.Sequential, mode: str) -> nn.Sequential:
    """Pad every convolution after conv0 with ``mode`` (``replicate`` or ``zeros``; in place).
    conv0 keeps its zeros: with the ImageNet fold, that is air."""
    for name, module in features.named_modules():
        if isinstance(module, nn.Conv3d) and name != "conv0" and any(module.padding):
            module.padding_mode = mode  # type: ignore[assignment]  # checked by the config
    return features


def load_model(path: Path, input_norm: str = "imagenet",
               conv_padding: str = "replicate") -> LoadedModel:
    """Load a model file written by ``save_model`` (``weights_only=True``, sha256 checked), conv0
    collapsed to one grey channel as ``input_norm`` says (see ``grey_input``), the convolutions
    after it padding with ``conv_padding``."""
    info = _our_model_info(path)
    network = _architecture()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    except Exception as exc:  # torch raises many types for a bad checkpoint
        raise _not_ours(path, str(exc)[:300]) from exc
    grey_input(network, input_norm)
    set_conv_padding(network, conv_padding)
    for param in network.parameters():
        param.requires_grad_(False)
    make_lean(network)  # same weights and numbers, a fraction of the peak memory
    network = network.eval().to(memory_format=torch.channels_last_3d)  # the fast path's layout
    check_lean(network, path)
    return LoadedModel(network=network, info=info)


def check_lean(network: nn.Module, path: Path) -> None:
    """The lean blocks must give torchvision's numbers: checked on a small input at every load,
    since they build on torchvision's private ``_DenseBlock`` and ``_Transition``.

    Raises:
        WeightsError: they differ (a torchvision this version does not know?).
    """
    from kneebatch.network.lean import lean_forward

    x = torch.linspace(0, 1, 32**3).reshape(1, 1, 32, 32, 32)
    outputs = []
    with torch.inference_mode():
        for on in (True, False):
            with lean_forward(on):
                outputs.append(network(x.contiguous(memory_format=torch.channels_last_3d)))
    error = float((outputs[0] - outputs[1]).abs().max())
    scale = float(outputs[1].abs().max()) or 1.0
    if not error <= 1e-4 * scale:
        raise WeightsError(
            f"Model {path}: the lean forward differs from torchvision's by {error:.3g} (of "
            f"{scale:.3g}) with torchvision {torchvision.__version__}. Run with --plain-forward "
            "and report this.")


_loads = 0


_load_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _cached_info(path: str, mtime_ns: int) -> ModelInfo:
    return _our_model_info(Path(path))


def _resolved(path: Path) -> tuple[str, int]:
    resolved = path.resolve()
    try:
        mtime_ns = resolved.stat().st_mtime_ns
    except OSError:
        mtime_ns = -1  # the loaders raise the helpful error
    return str(resolved), mtime_ns


def model_info(path: Path) -> ModelInfo:
    """The provenance of a model file (sidecar checked against the file's sha256), without
    building the network; read once per process (again if the file changes).

    Raises:
        WeightsError: see ``read_model_info``; also a file of an older kneebatch layout.
    """
    return _cached_info(*_resolved(path))


@functools.lru_cache(maxsize=2)
def _cached(path: str, mtime_ns: int, input_norm: str, conv_padding: str) -> LoadedModel:
    global _loads
    _loads += 1
    return load_model(Path(path), input_norm, conv_padding)


def get_model(path: Path, input_norm: str = "imagenet",
              conv_padding: str = "replicate") -> LoadedModel:
    """The model of ``path`` for ``input_norm`` and ``conv_padding`` (see ``load_model``),
    loaded once per process and reused (reloaded if the file changes)."""
    with _load_lock:  # two subjects starting at once in one worker load the model once
        return _cached(*_resolved(path), input_norm, conv_padding)


def model_loads() -> int:
    """How many times this process has loaded a model file through ``get_model``."""
    return _loads
