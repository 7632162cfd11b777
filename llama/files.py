"""Two small things every long-running writer here needs: a folder that appears whole or not at all, and one
progress line.

- `atomic_folder(dest)`: the caller fills a temporary folder beside `dest`; on success it is fsynced and renamed
  into place (an existing `dest` is moved aside first, because a rename cannot replace a non-empty folder), so a
  crash at any moment leaves either the old folder or the new one, never half of one. On an exception the
  temporary folder goes and `dest` stays as it was.
- `Progress(label)`: `progress(text)` rewrites one line in place on a terminal; in a log file it prints a line
  at most every `log_every` seconds. `done=True` ends the line. An empty label prints the text alone.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(dest: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder beside `dest`; replaces `dest` with it when the block ends without an
    exception. fsync=True also flushes the new folder and its parent to disk (checkpoints)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = dest.parent / f".tmp-{dest.name}-{os.getpid()}", dest.parent / f".old-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            fsync_dir(tmp)
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(dest, old)
        os.rename(tmp, dest)
        if fsync:
            fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Progress:
    """One line rewritten in place on a terminal (at most every `tty_every` s), a line every `log_every` s in a
    log; silent for work that finishes within `quiet` s."""

    def __init__(self, label: str, tty_every: float = 0.5, log_every: float = 10.0, quiet: float = 0.0):
        self.label, self.tty = label, sys.stdout.isatty()
        self.every, self.quiet = (tty_every if self.tty else log_every), quiet
        self.t0, self.last, self.shown = time.time(), float("-inf"), False

    def elapsed(self) -> float:
        return time.time() - self.t0

    def __call__(self, text: str, done: bool = False) -> None:
        now = time.time()
        if done:  # the closing line, unless the work was quick enough to stay silent
            show = self.shown or not self.quiet
        else:
            show = now - self.last >= self.every and now - self.t0 >= self.quiet
        if not show:
            return
        self.last, self.shown = now, True
        head = f"{self.label}: " if self.label else ""  # an empty label: the text alone
        print(f"{chr(13) if self.tty else ''}{head}{text}   ", end="\n" if done or not self.tty else "", flush=True)
