"""The `cifarexp` command line: the Typer app, its options, its commands, the terminal."""

from cifarexp.cli import measure, study  # noqa: F401 (they register their commands, in order)
from cifarexp.cli.base import app, main

__all__ = ["app", "main"]
