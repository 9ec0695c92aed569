"""Command line: a thin layer over the package, the only place that sets up logging and prints."""

from kneebatch.cli.main import entry, main

__all__ = ["entry", "main"]
