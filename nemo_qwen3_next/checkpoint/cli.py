"""What the conversion CLIs share: errors as one line (exit 2), library chatter held back.

The heavy imports (NeMo, Megatron, Lightning: ~25 s and a dozen lines of warnings no converter
user can act on) run inside `quiet`, which holds Python-level stdout/stderr in a buffer; the
buffer is shown only with ``--debug``. The progress bar writes to `console()`, the real stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import traceback

from .errors import CheckpointError

_console = None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (exit code 2, like every other refusal)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_converter_options(p: argparse.ArgumentParser) -> None:
    """The options both converters have, after their own."""
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--allow-non-finite", action="store_true", help="accept NaN/inf weights (refused by default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show library output and tracebacks")


def console():
    """The terminal's stderr, also while `quiet` holds `sys.stderr` (for progress bars)."""
    return _console or sys.stderr


@contextlib.contextmanager
def quiet(enabled: bool = True):
    """Hold what Python code prints (stdout and stderr) while the block runs; it is dropped after."""
    global _console
    if not enabled:
        yield
        return
    buf = io.StringIO()
    _console = sys.stderr
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    finally:
        _console = None


def run(prog: str, body, debug: bool) -> int:
    """`body()` -> report text; a refusal is one line on stderr and exit code 2 (traceback only with
    `debug`), an unexpected failure one line and exit code 1."""
    try:
        with quiet(not debug):
            report = body()
    except CheckpointError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a bad input: say so in one line
        if debug:
            traceback.print_exc()
        print(f"{prog}: internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    print(report)
    return 0
