"""kneebatch: deep features of knee CT cohorts from an ImageNet DenseNet121 inflated to 3D."""

from __future__ import annotations

__version__ = "0.1.0"
