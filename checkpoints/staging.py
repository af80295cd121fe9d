"""Stage an output directory: write into a temporary directory next to it, move it into place at the end.

A failed write (an exception, Ctrl-C) leaves nothing at the output path: the temporary directory is removed,
and so are the parent directories this call created for it (only if still empty). A disk that is full or
read-only is one `ConversionError` naming the output and the free space. With `overwrite`, an existing
output is moved aside, replaced, then deleted (restored if the replacement fails). Used by conversion
(`convert.py`) and export (`export.py`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.disk import free_space, quiet_write_failure_logs, write_failure


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def staged_output(out_dir: str | os.PathLike, overwrite: bool):
    """Yield a temporary directory next to `out_dir`; rename it to `out_dir` on success, delete it on failure."""
    out = Path(out_dir).absolute()
    if os.path.lexists(out) and not overwrite:
        raise ConversionError("output already exists (pass overwrite=True or --overwrite)", file=str(out))
    created = []  # parents made here, deepest last
    parent = out.parent
    while not os.path.lexists(parent):
        created.append(parent)
        parent = parent.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create the output's parent directory: {e.strerror or e}",
                              file=str(out)) from None
    quiet_write_failure_logs()
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    try:
        tmp.mkdir()
    except OSError as e:
        _remove_created(created)
        raise ConversionError(f"cannot create a directory next to the output: {e.strerror or e}",
                              file=str(out)) from None
    try:
        yield tmp
        old = None
        if os.path.lexists(out):
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        reason = write_failure(e) if isinstance(e, Exception) and not isinstance(e, ConversionError) else None
        if reason is not None:  # disk full / read-only: one error naming the output and the free space
            raise ConversionError(f"cannot write the output: {reason} ({free_space(str(out.parent))}); nothing was "
                                  f"left there", file=str(out)) from e
        raise
    if old is not None:
        _remove(old)


def _remove_created(created: list[Path]) -> None:
    for d in created:  # deepest first
        try:
            os.rmdir(d)
        except OSError:
            break
