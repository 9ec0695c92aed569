"""kneebatch: deep features of knee CT cohorts from an ImageNet DenseNet121 inflated to 3D.

The public API (imported lazily, so ``import kneebatch`` stays instant)::

    build_model(weights="imagenet" | "random" | PATH, seed=0) -> (network, weights source)
    extract_subject(ct, mask, model_path, subject_id=..., side=..., config=...) -> SubjectResult
    run_cohort(manifest, out, model_path, client=None, config=..., ...) -> RunSummary
    read_results(out) -> Results(similarities, features, regions, failures)
    feature_matrix(out, layer=None, region=None, with_extras=False) -> wide subject x feature table
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ExtractionConfig", "build_model", "extract_subject", "feature_matrix", "read_results",
           "run_cohort"]

if TYPE_CHECKING:
    from kneebatch.api import extract_subject, read_results
    from kneebatch.cohort.run import run_cohort
    from kneebatch.config import ExtractionConfig
    from kneebatch.network.weights import build_model
    from kneebatch.results.tables import feature_matrix

_HOMES = {"build_model": "kneebatch.network.weights", "extract_subject": "kneebatch.api",
          "read_results": "kneebatch.api", "run_cohort": "kneebatch.cohort.run",
          "ExtractionConfig": "kneebatch.config", "feature_matrix": "kneebatch.results.tables"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'kneebatch' has no attribute {name!r}")
