"""How full a filesystem is, for the messages of writes that fail (disk full, quota)."""

from __future__ import annotations

import os
import shutil


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
