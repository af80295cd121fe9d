"""Reading a compiled program's HLO text: its collectives, and how often each runs per step.

`compiled.as_text()` lists computations (`ENTRY`, while bodies and conditions, fusions, async wrappers),
each a block of `name = SHAPE op(operands), attributes` lines. A collective inside a `while` body runs
once per trip, and XLA's own cost analysis counts it once; here every computation gets a *multiplier*,
the number of times it runs per step: 1 for ENTRY, the trip count of a while loop for its body (from
XLA's `known_trip_count` annotation, or else the loop condition `compare(i, constant(N)), direction=LT`, the
form `lax.scan` lowers to), and the
caller's multiplier for anything called (fusions, async starts, branches). A loop whose trip count the
condition does not state (a data-dependent `while`) counts once and is listed in `unknown_trip_counts`.
"""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
# one instruction per line: `[ROOT] [%]name = SHAPE OP(operands), ...`; SHAPE may be a long tuple with
# `/*index=N*/` comments, so it is everything up to the first collective op name followed by "("
_OP_RE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+"
                    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(", re.MULTILINE)
_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER_RE = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALL_RE = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES_RE = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE_RE = re.compile(r"\swhile\(.*?condition=%?(?P<cond>[\w.\-]+),\s*body=%?(?P<body>[\w.\-]+)")
_CONST_RE = re.compile(r"^\s*%?(?P<name>[\w.\-]+)\s*=\s*[su](?:32|64)\[\]\S*\s+constant\((?P<value>-?\d+)\)")
_LT_RE = re.compile(r"compare\(%?(?P<a>[\w.\-]+),\s*%?(?P<b>[\w.\-]+)\),\s*direction=LT")
_CHANNEL_RE = re.compile(r"\bchannel_id=(\d+)")
_KNOWN_TRIPS_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def array_bytes(shape_text: str) -> list[int]:
    """Bytes of every array in an HLO shape (`bf16[2,3]{1,0}` or a tuple of them)."""
    out = []
    for dtype, dims in _ARRAY_RE.findall(shape_text):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(size * _DTYPE_BYTES.get(dtype, 0))
    return out


def computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """({computation name: its instruction lines}, the ENTRY computation's name)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER_RE.match(line)
            if m and "=" not in line.split("(", 1)[0]:
                current = m.group("name")
                comps[current] = []
                if m.group("entry"):
                    entry = current
        elif line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    return comps, entry


def _trip_count(while_line: str, cond: str, comps: dict[str, list[str]]) -> int | None:
    """The loop's trip count: XLA's `known_trip_count` annotation (XLA:CPU), else the bound of the condition's
    `i < N` (TPU), where the compare may sit in a fusion the condition calls with its constant N."""
    known = _KNOWN_TRIPS_RE.search(while_line)
    if known:
        return int(known.group(1))
    lines = comps.get(cond, [])
    consts = {m.group("name"): int(m.group("value")) for m in map(_CONST_RE.match, lines) if m}
    for line in lines:
        m = _LT_RE.search(line)
        if m and m.group("b") in consts:
            return consts[m.group("b")]
    called = [c for line in lines for c in _CALL_RE.findall(line)]
    if len(consts) == 1 and any(_LT_RE.search(x) for c in called for x in comps.get(c, [])):
        return next(iter(consts.values()))
    return None


def multipliers(hlo_text: str) -> tuple[dict[str, float], list[str]]:
    """({computation: times it runs per step}, [while loops whose trip count is unknown (counted once)])."""
    comps, entry = computations(hlo_text)
    if entry is None:
        return {name: 1.0 for name in comps}, []
    out: dict[str, float] = {}
    unknown: list[str] = []

    def visit(name: str, times: float, depth: int = 0) -> None:
        if name not in comps or depth > 64:
            return
        out[name] = out.get(name, 0.0) + times
        for line in comps[name]:
            loop = _WHILE_RE.search(line)
            if loop:
                trips = _trip_count(line, loop.group("cond"), comps)
                if trips is None:
                    unknown.append(loop.group("body"))
                visit(loop.group("cond"), times * ((trips or 0) + 1), depth + 1)
                visit(loop.group("body"), times * (trips if trips is not None else 1), depth + 1)
                continue
            callees = _CALL_RE.findall(line)
            for group in _BRANCHES_RE.findall(line):
                callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
            for callee in callees:
                visit(callee, times, depth + 1)

    visit(entry, 1.0)
    return out, unknown


def collective_stats(hlo_text: str, per_step: bool = False) -> dict[str, dict[str, float]]:
    """{kind: {"count": n, "bytes": result bytes per device}} for each collective kind in HLO text.

    `per_step=False`: every instruction once (static count). True: each times its computation's multiplier
    (a collective in the body of a 32-trip loop counts 32 times). Instructions sharing a `channel_id` are one
    collective (TPU HLO repeats an async all-gather in its start, overlap and done computations). Async pairs
    count once, at their `-start`;
    a `-start` result tuple holds operands then results, so only its second half is counted. A tuple
    all-reduce counts every array of the tuple.
    """
    stats = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    comps, _ = computations(hlo_text)
    if not comps:  # bare instruction lines
        comps = {"": hlo_text.splitlines()}
    times = multipliers(hlo_text)[0] if per_step else {}
    channels: set[str] = set()
    for name, lines in comps.items():
        k = times.get(name, 1)  # a computation not reached from ENTRY (or a static count): once
        for line in lines:
            m = _OP_RE.match(line)
            if not m:
                continue
            channel = _CHANNEL_RE.search(line)
            if channel:  # TPU splits an async collective over start / overlap / done computations: one channel
                if channel.group(1) in channels:
                    continue
                channels.add(channel.group(1))
            sizes = array_bytes(m.group("shape"))
            if m.group("start") and m.group("shape").startswith("("):
                arrays = [s for s in sizes if s > 4] or sizes  # drop scalar u32 contexts
                sizes = arrays[len(arrays) // 2:]
            stats[m.group("op")]["count"] += k
            stats[m.group("op")]["bytes"] += k * sum(sizes)
    return stats


def while_loops(hlo_text: str) -> int:
    """Number of `while` instructions in the program."""
    return sum(1 for _ in re.finditer(r"\swhile\(", hlo_text))


_LAYOUT_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\](?:\{([^}]*)\})?")


def _padded_bytes(dtype: str, dims: list[int], layout: str) -> int:
    """Bytes of one array in device memory: its physically minor dims padded to the layout's first tile."""
    order, _, tiling = layout.partition(":")
    minor_to_major = [int(v) for v in order.split(",") if v.strip()] or list(range(len(dims)))[::-1]
    physical = [dims[i] for i in reversed(minor_to_major)] or [1]  # major → minor; a scalar is one element
    tile = re.match(r"T\(([0-9,]+)\)", tiling)
    if tile:
        sizes = [int(v) for v in tile.group(1).split(",")]
        for k, t in enumerate(reversed(sizes)):
            if k < len(physical):
                i = len(physical) - 1 - k
                physical[i] = -(-physical[i] // t) * t
    return math.prod(physical) * _DTYPE_BYTES.get(dtype, 0)


def entry_parameters(hlo_text: str) -> list[dict]:
    """Each parameter of the compiled program (its `entry_computation_layout`): dtype, dims, logical bytes and
    bytes as laid out on the device (TPU tiles pad the minor dims: f32[64] in T(128) tiles takes 128 floats, and a
    scalar in T(128) tiles 128 elements)."""
    head = hlo_text.split("\n", 1)[0]
    start = head.find("entry_computation_layout={(")
    if start < 0:
        return []
    params = head[start + len("entry_computation_layout={("):head.find(")->", start)]
    out = []
    for dtype, dims_text, layout in _LAYOUT_ARRAY_RE.findall(params):
        dims = [int(d) for d in dims_text.split(",") if d]
        out.append({"dtype": dtype, "dims": dims, "bytes": math.prod(dims) * _DTYPE_BYTES.get(dtype, 0),
                    "device_bytes": _padded_bytes(dtype, dims, layout or "")})
    return out
