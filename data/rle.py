"""COCO run-length encoding of binary masks (the `{"size": [h, w], "counts": ...}` of COCO, SA-V, MeViS).

The mask is read in column-major (Fortran) order; `counts` alternate runs of 0s and 1s, starting with 0s
(so the first run may be 0). The compressed string form (pycocotools `rleToString`) writes each count,
from the fourth on as the difference to the count two before, in little-endian groups of 5 bits, each
character `48 + group` with bit 0x20 set when more groups follow; the last group's bit 0x10 is the sign.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tpo_jax.data.records import MediaBudget, RecordError, is_int as _is_int, rle_size


def _check_mask(mask) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise RecordError(f"mask must be 2-D (h, w), got shape {m.shape}")
    return m.astype(bool)


def counts_from_mask(mask) -> list[int]:
    """Uncompressed run lengths of a (h, w) binary mask, column-major, starting with a run of 0s."""
    flat = _check_mask(mask).ravel(order="F")
    if flat.size == 0:
        return [0]
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def counts_to_string(counts: Sequence[int]) -> str:
    """Compressed COCO string of a list of run lengths."""
    out = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        while True:
            group = x & 0x1F
            x >>= 5  # arithmetic shift, as in C for a signed value
            more = (x != -1) if (group & 0x10) else (x != 0)
            out.append(chr(48 + (group | 0x20 if more else group)))
            if not more:
                break
    return "".join(out)


def counts_from_string(s: str | bytes) -> list[int]:
    """Run lengths of a compressed COCO string."""
    if isinstance(s, bytes):
        try:
            s = s.decode("ascii")
        except UnicodeDecodeError:
            raise RecordError(f"RLE string is not ASCII: {s[:40]!r}") from None
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise RecordError(f"RLE string ends inside a count: {s[:40]!r}")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise RecordError(f"RLE string has an invalid character {s[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            if k > 12:  # 65 bits: no real count is that long
                raise RecordError(f"RLE string holds a count of more than 13 characters: {s[:40]!r}")
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_counts(rle: dict[str, Any], budget: MediaBudget | None = None) -> list[int]:
    """The run lengths of an RLE dict (compressed string or uncompressed list of integers), checked against
    its size."""
    h, w = rle_size(rle, budget)
    if "counts" not in rle:
        raise RecordError("RLE needs 'counts'")
    raw = rle["counts"]
    if isinstance(raw, (str, bytes)):
        if len(raw) > 8 * (h * w + 2):  # each count needs at most ~7 characters; more cannot sum to h*w
            raise RecordError(f"RLE string of {len(raw)} characters for a {h}x{w} mask")
        counts = counts_from_string(raw)
    elif isinstance(raw, (list, tuple)):
        if len(raw) > h * w + 1 or not all(_is_int(c) for c in raw):
            bad = next((c for c in raw if not _is_int(c)), None)
            raise RecordError(f"RLE counts must be a list of at most h*w+1 integers, got {len(raw)} "
                              f"(e.g. {bad!r})" if bad is not None else
                              f"RLE counts must be a list of at most h*w+1 integers, got {len(raw)}")
        counts = [int(c) for c in raw]
    else:
        raise RecordError(f"RLE counts must be a string or a list, got {type(raw).__name__}")
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise RecordError(f"RLE counts must be non-negative and sum to h*w = {h * w}, "
                          f"got sum {sum(counts)} (min {min(counts, default=0)})")
    return counts


def rle_encode(mask, compressed: bool = True) -> dict[str, Any]:
    """(h, w) binary mask → {"size": [h, w], "counts": str (compressed) or list[int]}."""
    m = _check_mask(mask)
    counts = counts_from_mask(m)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": counts_to_string(counts) if compressed else counts}


def rle_decode(rle: dict[str, Any], budget: MediaBudget | None = None) -> np.ndarray:
    """RLE dict → (h, w) uint8 mask of 0/1 (h × w within `budget.max_mask_pixels`)."""
    h, w = rle_size(rle, budget)
    counts = rle_counts(rle, budget)
    values = np.arange(len(counts)) % 2
    flat = np.repeat(values.astype(np.uint8), counts)
    return flat.reshape((w, h)).T.copy()


def rle_area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels."""
    return int(sum(rle_counts(rle)[1::2]))


def rle_union(rles: Sequence[dict[str, Any]], compressed: bool = True) -> dict[str, Any]:
    """Pixel-wise OR of RLEs of one size."""
    if not rles:
        raise RecordError("rle_union needs at least one RLE")
    sizes = {rle_size(r) for r in rles}
    if len(sizes) != 1:
        raise RecordError(f"rle_union of masks of different sizes {sorted(sizes)}")
    out = np.zeros(sizes.pop(), bool)
    for r in rles:
        out |= rle_decode(r).astype(bool)
    return rle_encode(out, compressed)


def mask_to_box(mask) -> np.ndarray | None:
    """Tight pixel box (x0, y0, x1, y1) of the foreground, x1/y1 exclusive (last column/row + 1); None if empty."""
    m = _check_mask(mask)
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    if len(cols) == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)


def rle_to_box(rle: dict[str, Any]) -> np.ndarray | None:
    """:func:`mask_to_box` of an RLE."""
    return mask_to_box(rle_decode(rle))


__all__ = ["rle_size", "counts_from_mask", "counts_to_string", "counts_from_string", "rle_counts", "rle_encode",
           "rle_decode", "rle_area", "rle_union", "mask_to_box", "rle_to_box"]
