"""The one error type of the conversion tools."""

from __future__ import annotations


class ConversionError(Exception):
    """A checkpoint cannot be converted: names the file and the key (when there is one) and what was expected."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.detail = (None if file is None else str(file)), key, message
        where = []
        if self.file is not None:
            where.append(self.file)
        if key is not None:
            where.append(f"key '{key}'")
        super().__init__(": ".join(where + [message]))
