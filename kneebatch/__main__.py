"""``python -m kneebatch``."""

from __future__ import annotations

from kneebatch.cli.main import entry

entry()
