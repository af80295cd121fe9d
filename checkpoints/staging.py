"""Stage an output directory: write into a temporary directory next to it, move it into place at the end.

A failed write (an exception, Ctrl-C) leaves nothing at the output path. Used by conversion (`convert.py`)
and export (`export.py`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from tpo_jax.checkpoints.errors import ConversionError


@contextlib.contextmanager
def staged_output(out_dir: str | os.PathLike, overwrite: bool):
    """Yield a temporary directory next to `out_dir`; rename it to `out_dir` on success, delete it on failure."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise ConversionError("output already exists (pass overwrite=True or --overwrite)", file=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
