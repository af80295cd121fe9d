"""The one error type of the conversion tools."""

from __future__ import annotations

SHOWN_CHARS = 300  # a key or path longer than this is cut in the message (the attribute keeps it whole)


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` for a one-line message: control / unprintable characters escaped, cut to `limit` characters."""
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class ConversionError(Exception):
    """A checkpoint cannot be converted: names the file and the key (when there is one) and what was expected.

    The message is one line, `<file>: key '<key>': <what>`; `file`, `key` and `detail` keep the parts as given."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.detail = (None if file is None else str(file)), key, message
        where = []
        if self.file is not None:
            where.append(shown(self.file))
        if key is not None:
            where.append(f"key '{shown(str(key))}'")
        super().__init__(": ".join(where + [message]))
