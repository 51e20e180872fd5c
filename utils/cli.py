"""Every entry point's `main(argv=None)`: parse the command line, then run (docs/safety.md).

argparse ends `--help` (and `--version`) with SystemExit; `cli_main` turns that into main's
return value, so `main(["--help"])` returns 0 from tests and scripts alike. Bad arguments raise
UsageError (utils.errors.CliParser), which run_cli prints as one line.
"""
from __future__ import annotations

import argparse
import functools
from typing import Callable, Sequence


def cli_main(build_parser: Callable[[], argparse.ArgumentParser]):
    """Decorator: `@cli_main(build_parser)` over `def main(args) -> int` gives `main(argv=None)`
    that parses argv with build_parser() and calls the decorated function with the result."""
    def wrap(run: Callable[[argparse.Namespace], int | None]):
        @functools.wraps(run)
        def main(argv: Sequence[str] | None = None) -> int:
            try:
                args = build_parser().parse_args(argv)
            except SystemExit as e:  # --help was printed
                return int(e.code or 0)
            return int(run(args) or 0)
        return main
    return wrap
