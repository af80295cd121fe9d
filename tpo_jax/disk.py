"""Writes that fail for lack of room or rights (disk full, quota, read-only filesystem): the reason, how full the
filesystem is, and quiet logs from the background writers that report them (Orbax / TensorStore), so a failed
write is one message from the code that started it."""

from __future__ import annotations

import errno
import logging
import os
import shutil

WRITE_FAILURES = ("No space left on device", "Read-only file system", "Disk quota exceeded", "Permission denied")


def free_space(path: str) -> str:
    """'N MiB free of M MiB' on the filesystem holding `path` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"


def write_failure(e: BaseException) -> str | None:
    """The reason when `e` is a write that failed for lack of room or rights — an OSError, or a library error
    wrapping one (TensorStore's `RESOURCE_EXHAUSTED: ... No space left on device`) — else None."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES):
        return e.strerror or str(e)
    text = str(e)
    return next((reason for reason in WRITE_FAILURES if reason in text), None)


def _not_a_logged_write_failure(record: logging.LogRecord) -> bool:
    """False for an ERROR record of Orbax's background threads (and their asyncio tasks) about a failed write:
    the code that started the write raises it as one error of its own."""
    if record.levelno < logging.ERROR:
        return True
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += " " + str(record.exc_info[1])
    from_orbax = "orbax" in record.pathname or "orbax-checkpoint-tmp" in text
    return not (from_orbax and (any(r in text for r in WRITE_FAILURES) or "RESOURCE_EXHAUSTED" in text
                                or "background save thread" in text or "Save Finalize thread" in text))


def quiet_write_failure_logs() -> None:
    """Drop the tracebacks Orbax's background threads log for a failed write (idempotent)."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if _not_a_logged_write_failure not in logger.filters:
            logger.addFilter(_not_a_logged_write_failure)
