"""Error types shared by every entry point.

Each error carries a distinct exit code so that scripts (and hospital batch jobs) can tell
what went wrong without parsing text. Entry points catch `MitsError` and print one line.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


class MitsError(Exception):
    """Base class: a user-facing problem with a one-line message."""

    exit_code = 2


class UsageError(MitsError):
    exit_code = 2


class CliParser(argparse.ArgumentParser):
    """argparse that raises UsageError: one line through run_cli (exit code 2), not usage + exit."""

    def error(self, message):
        raise UsageError(message)


class InputFileError(MitsError):
    """Missing, unreadable or empty input path."""

    exit_code = 3


class ScanFormatError(MitsError):
    """The file exists but is not a usable CT scan (bad header, missing slice, not CT, ...)."""

    exit_code = 4


class CoordinateError(MitsError):
    """A tamper/protect coordinate outside the scan or malformed."""

    exit_code = 5


class ModelFileError(MitsError):
    """A model/checkpoint/equaliser file is missing or of the wrong kind."""

    exit_code = 6


class OutputError(MitsError):
    """The output cannot be written (read-only folder, full disk, would overwrite the input)."""

    exit_code = 7


class UnsafeFileError(ModelFileError):
    """A file asked to run code (pickle globals, Keras Lambda layers, ...): refused."""

    exit_code = 8


class DataFetchError(MitsError):
    """The real scans could not be fetched (offline, checksum mismatch)."""

    exit_code = 9


def run_cli(
    main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None
) -> int:
    """Run `main(argv)`; turn a MitsError into one line on stderr and its exit code."""
    try:
        rc = main(argv)
    except MitsError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


# The seal verifier's findings (docs/seal.md#exit-codes). A tampered scan is a verdict, not an
# error: verify.py prints its map and exits with TAMPERED_EXIT.
TAMPERED_EXIT = 10


class NoSealError(MitsError):
    """The pixels carry no seal header (never sealed, or re-encoded)."""

    exit_code = 11


class WrongKeyError(MitsError):
    """A seal header is there, but no block verifies with this key."""

    exit_code = 12


class BlockSizeError(MitsError):
    """The seal was made with another block size than the one asked for."""

    exit_code = 13


class KeyFileError(MitsError):
    """A seal key file that is not 32 bytes, or that other users can read."""

    exit_code = 14
