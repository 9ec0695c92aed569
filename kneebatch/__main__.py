"""``python -m kneebatch``."""

from __future__ import annotations

import sys

from kneebatch.cli import main

sys.exit(main())
