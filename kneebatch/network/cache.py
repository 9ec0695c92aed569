"""The per-process model cache: each worker process loads a model file once and reuses it (again
only if the file changes); counted so tests can prove it."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

from kneebatch.config import ConvPadding, InputNorm
from kneebatch.network.model import LoadedModel, load_model
from kneebatch.network.provenance import ModelInfo, our_model_info

_loads = 0
_load_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _cached_info(path: str, mtime_ns: int) -> ModelInfo:
    return our_model_info(Path(path))


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
def _cached(path: str, mtime_ns: int, input_norm: InputNorm, conv_padding: ConvPadding) -> LoadedModel:
    global _loads
    _loads += 1
    return load_model(Path(path), input_norm, conv_padding)


def get_model(path: Path, input_norm: InputNorm = "imagenet",
              conv_padding: ConvPadding = "replicate") -> LoadedModel:
    """The model of ``path`` for ``input_norm`` and ``conv_padding`` (see ``load_model``),
    loaded once per process and reused (reloaded if the file changes)."""
    with _load_lock:  # two subjects starting at once in one worker load the model once
        return _cached(*_resolved(path), input_norm, conv_padding)


def model_loads() -> int:
    """How many times this process has loaded a model file through ``get_model``."""
    return _loads
