"""The per-process model cache: each worker process loads a model file once and reuses it (again
only if the file changes); counted so tests can prove it."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

from kneebatch.config import ConvPadding, InputNorm
from kneebatch.network.model import LoadedModel, load_model
from kneebatch.network.provenance import resolved

_loads = 0
_load_lock = threading.Lock()


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
        return _cached(*resolved(path), input_norm, conv_padding)


def model_loads() -> int:
    """How many times this process has loaded a model file through ``get_model``."""
    return _loads
