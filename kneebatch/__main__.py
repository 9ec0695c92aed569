"""``python -m kneebatch``."""

from __future__ import annotations

from kneebatch.cli import entry

entry()
