"""Atomic output directories: written beside the target, renamed into place, never left behind.

A run writes into ``.<name>.tmp-<pid>`` and renames it to ``<name>`` at the end. It is removed
on any exception, on SIGTERM/SIGINT/SIGHUP (turned into exceptions for the run's duration), and,
after a kill -9, by the next run for the same target: a sibling whose pid is no longer alive is
stale. A run killed between moving the old target aside (``.<name>.old-<pid>``) and renaming the
new one in gets the old target back. What was cleaned up is reported (CLIs print it; the library
logs a warning), never done silently.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from typing import List

from .errors import CheckpointError

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier call in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs(output: str) -> List[str]:
    """Remove the ``.tmp-<pid>`` / ``.old-<pid>`` siblings of `output` left by dead runs (an
    ``.old`` one is renamed back when `output` is missing: it is the intact previous target).
    Returns what was removed or restored."""
    output = os.path.abspath(output)
    parent, base = os.path.split(output)
    if not os.path.isdir(parent):
        return []
    pattern = re.compile(rf"^\.{re.escape(base)}\.(tmp|old)-(\d+)$")
    done = []
    for entry in sorted(os.listdir(parent)):
        m = pattern.match(entry)
        if not m or _alive(int(m.group(2))):
            continue
        path = os.path.join(parent, entry)
        if m.group(1) == "old" and not os.path.exists(output):
            os.rename(path, output)
        else:
            shutil.rmtree(path, ignore_errors=True)
        done.append(path)
    return done


@contextmanager
def _signals_raise():
    """SIGTERM / SIGHUP raise SystemExit (SIGINT already raises KeyboardInterrupt) in the main thread,
    so `finally` blocks run; the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    saved = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def check_output(output: str, overwrite: bool) -> None:
    """Refuse an existing `output` unless `overwrite` (cheap; CLIs call it before heavy imports)."""
    if os.path.exists(os.path.abspath(output)) and not overwrite:
        raise CheckpointError(f"output {os.path.abspath(output)} already exists; pass --overwrite "
                              f"(overwrite=True) to replace it")


@contextmanager
def atomic_output_dir(output: str, overwrite: bool):
    """Yield a temporary directory beside `output`; rename it to `output` only on success."""
    output = os.path.abspath(output)
    parent, base = os.path.split(output)
    os.makedirs(parent, exist_ok=True)
    for path in remove_stale_temp_dirs(output):
        log.warning("cleaned up %s, left behind by a killed run", path)
    check_output(output, overwrite)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    old = os.path.join(parent, f".{base}.old-{os.getpid()}")
    with _signals_raise():
        os.makedirs(tmp)
        try:
            yield tmp
            if os.path.exists(output):
                os.rename(output, old)
            os.rename(tmp, output)
        except BaseException:
            if os.path.exists(old) and not os.path.exists(output):
                os.rename(old, output)  # the previous target, untouched
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    shutil.rmtree(old, ignore_errors=True)
