"""What every command does with an error: one line on stderr and an exit status, a traceback only with --debug.

    exit 2    bad input: a config field, a file or directory, a dataset, a checkpoint (the message names it)
    exit 1    the work failed (a training run stopped by non-finite losses or a checkpoint it could not write)
    exit 130  interrupted (Ctrl-C)

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable

from tpo_jax.disk import free_space

# (module, class): an exception can only be an instance of a class whose module is imported, so the check
# imports nothing (a command that never loaded Orbax does not load it to print an error)
BAD_INPUT = (("tpo_jax.config", "ConfigError"), ("tpo_jax.checkpoints.manager", "CheckpointError"),
             ("tpo_jax.checkpoints.errors", "ConversionError"), ("tpo_jax.data.records", "DataError"))
FAILURE = (("tpo_jax.train.nonfinite", "NonFiniteError"), ("tpo_jax.train.trainer", "TrainingError"),
           ("tpo_jax.checkpoints.manager", "CheckpointWriteError"))


def _classes(names) -> tuple[type, ...]:
    return tuple(getattr(sys.modules[m], c) for m, c in names if m in sys.modules and hasattr(sys.modules[m], c))


def add_debug_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")


def one_line(e: BaseException) -> str:
    """The error as one line (an OSError as 'PATH: reason')."""
    if isinstance(e, OSError) and e.filename is not None:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # disk full: say how full
            return f"{e.filename}: {e.strerror or e} ({free_space(str(e.filename))})"
        return f"{e.filename}: {e.strerror or e}"
    return " ".join(str(e).split()) or type(e).__name__


def guarded(prog: str, body: Callable[[], int], debug: bool = False, interrupted: str = "") -> int:
    """`body()`, with its errors turned into one line on stderr and an exit status (module docstring)."""
    try:
        return body()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted{'; ' + interrupted if interrupted else ''}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        if debug:
            raise
        if isinstance(e, _classes(BAD_INPUT) + (OSError,)):
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
            return 2
        if isinstance(e, _classes(FAILURE)):
            print(f"{prog}: training stopped: {one_line(e)}", file=sys.stderr)
            return 1
        raise
