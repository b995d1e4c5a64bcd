"""Command-line tools (``zeromask-train``, ``-eval``, ``-make-data``, ``-plots``, ...).

User errors end in one line on stderr and exit code 2 (as argparse's own usage errors):
:class:`UsageError` for bad options or data, :class:`zeromask.models.training.CheckpointError`
for a truncated or foreign checkpoint, ``FileNotFoundError`` for a missing path. Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import sys


class UsageError(Exception):
    """A user error a command reports in one line (exit code 2)."""


@contextlib.contextmanager
def cli_errors(prog: str):
    """Turn the user errors raised inside into ``prog: message`` and exit code 2."""
    from ..models.training import CheckpointError
    try:
        yield
    except (UsageError, CheckpointError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
