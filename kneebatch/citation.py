"""How to cite kneebatch: the same title, version and licence as ``CITATION.cff`` (a test keeps the
two in step), for ``kneebatch info`` and the report."""

from __future__ import annotations

from kneebatch import __version__

TITLE = "kneebatch: deep features of knee CT cohorts from an ImageNet DenseNet121 inflated to 3D"
AUTHORS = "The kneebatch developers"
LICENSE = "Apache-2.0"


def citation() -> str:
    """One line to cite this version of kneebatch (``CITATION.cff`` holds the full record)."""
    return f"{AUTHORS}. {TITLE}. Version {__version__}. Licence {LICENSE}. See CITATION.cff."
