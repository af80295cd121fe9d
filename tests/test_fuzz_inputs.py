"""Seeded fuzzing of everything that reads outside input (issue 26): the annotation parsers of
`tpo_jax.data.formats`, the media decoders (images, videos), COCO RLE, the pipeline's per-record
`Prepare` step and `tpo-convert` (mutated safetensors headers, raw bytes, indexes, FIFOs, symlinks,
`.bin` files: tests/fuzz_convert.py). Valid synthetic inputs are mutated (fields deleted, types swapped, huge / negative /
NaN / inf numbers, numbers as strings, deep nesting, 5,000-digit integers, lone surrogates, path
traversal, symlinks out of the media root, truncated / garbage / bomb media, wrong extensions).

Per case, `run_case` asserts: no exception other than the project's (`RecordError` / `DataError`)
escapes, no hang (a per-case time limit, SIGALRM), every rejection message names its input (the
file, or the record id), and the peak Python-tracked allocation (`tracemalloc`: NumPy arrays and
Python objects; PIL / FFmpeg buffers are bounded by the budget checks before decoding) stays under
the family's limit.

Families are `Family(name, cases, run)` entries of `FAMILIES`: `cases(rng, n)` yields `n` `Case`s,
`run(case, workdir)` returns an `Outcome` (accepted / rejected counts, problems). To add one, append a
`Family` (one parametrized test runs them all; `benchmarks/bench_fuzz.py` runs the same families at
thousands of cases).
"""

from __future__ import annotations

import copy
import importlib
import dataclasses
import io
import json
import os
import signal
import tempfile
import time
import tracemalloc
import zlib
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from tpo_jax.data.records import DataError, MediaBudget, Record, RecordError

CASES_PER_FAMILY = 24  # × 15 families = 360 cases; benchmarks/bench_fuzz.py --cases for more
TIME_LIMIT_S = 5.0  # per case
PEAK_LIMIT = 64 << 20  # bytes, tracemalloc peak per case


@dataclasses.dataclass
class Case:
    label: str  # what was mutated (for failure messages)
    payload: Any


@dataclasses.dataclass
class Outcome:
    accepted: int = 0
    rejected: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    def reject(self, err: BaseException, *names: str) -> None:
        """A project error: counted; its message must name one of `names` (the input)."""
        self.rejected += 1
        msg = str(err)
        if not any(n and n in msg for n in names):
            self.problems.append(f"rejection does not name {names[0]!r}: {msg[:200]}")
        if "\n" in msg:
            self.problems.append(f"rejection message spans lines: {msg[:200]!r}")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    cases: Callable[[np.random.Generator, int], Iterator[Case]]
    run: Callable[[Case, str], Outcome]
    time_limit: float = TIME_LIMIT_S
    peak_limit: int = PEAK_LIMIT
    warmup: Callable[[str], None] | None = None  # run once before the cases, unmeasured (imports, caches)


@dataclasses.dataclass
class Result:
    status: str  # "ok", "uncaught", "hang", "problem", "over_memory"
    outcome: Outcome | None
    peak: int
    seconds: float
    detail: str = ""


class _Hang(BaseException):
    """Raised by the per-case alarm (a BaseException: project code catching Exception cannot swallow it)."""


def _alarm(signum, frame):
    raise _Hang()


def run_case(family: Family, case: Case, workdir: str) -> Result:
    """Run one case under the time limit and tracemalloc; classify what happened."""
    os.makedirs(workdir, exist_ok=True)
    old = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    t0 = time.perf_counter()
    outcome, status, detail = None, "ok", ""
    try:
        signal.setitimer(signal.ITIMER_REAL, family.time_limit)
        try:
            outcome = family.run(case, workdir)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Hang:
        status, detail = "hang", f"over {family.time_limit} s"
    except (RecordError, DataError) as e:  # a runner lets a project error escape only by mistake
        status, detail = "problem", f"project error escaped the runner: {e}"
    except Exception as e:  # noqa: BLE001
        status, detail = "uncaught", f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, old)
    seconds = time.perf_counter() - t0
    if status == "ok" and outcome.problems:
        status, detail = "problem", "; ".join(outcome.problems[:3])
    if status == "ok" and peak > family.peak_limit:
        status, detail = "over_memory", f"peak {peak} bytes > {family.peak_limit}"
    return Result(status, outcome, peak, seconds, detail)


def family_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


# --- JSON mutation ---------------------------------------------------------------------------------------------

DEEP, HUGE_INT = "__DEEP_NESTING__", "__HUGE_INT__"
HOSTILE = [None, True, False, 0, -1, -7.5, 1e308, -1e308, float("nan"), float("inf"), -float("inf"), 10 ** 30,
           "", "\ud800", "x\udfffy", "x" * 5000, "../../outside/x.mp4", "/etc/passwd", "link/x.mp4",
           "escape.mp4", "NaN", "Infinity", "1e9", "-3", "12", [], {}, [[[]]], [None], {"size": [50000, 50000]},
           {"size": [6, 8], "counts": "0" * 200}, DEEP, HUGE_INT, 1e10, 100000, -100000, 2 ** 63]


def _nodes(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nodes(v, path + (i,))


def _get_at(value, path):
    for p in path:
        value = value[p]
    return value


def mutate(value, rng: np.random.Generator, n: int | None = None):
    """`n` (1-3) random mutations of a JSON-like value: delete, hostile value, number <-> string, grow a list."""
    value = copy.deepcopy(value)
    for _ in range(int(n or rng.integers(1, 4))):
        paths = list(_nodes(value))
        path = paths[int(rng.integers(len(paths)))]
        if not path:
            if rng.random() < 0.1:
                value = copy.deepcopy(HOSTILE[int(rng.integers(len(HOSTILE)))])
            continue
        parent, key = _get_at(value, path[:-1]), path[-1]
        old = parent[key]
        op = rng.integers(6)
        if op == 0:
            del parent[key]
        elif op == 1 and isinstance(old, (int, float)) and not isinstance(old, bool):
            parent[key] = str(old)
        elif op == 2 and isinstance(old, str):
            parent[key] = [old] if rng.random() < 0.5 else float(rng.choice([-1, 1e12, np.inf]))
        elif op == 3 and isinstance(old, list) and old:
            parent[key] = [copy.deepcopy(x) for x in old * int(rng.choice([2, 50]))]
        elif op == 4 and isinstance(old, (int, float)) and not isinstance(old, bool):
            parent[key] = float(rng.choice([-old, old * 1e9, np.nan, -np.inf, 0.0]))
        else:
            parent[key] = copy.deepcopy(HOSTILE[int(rng.integers(len(HOSTILE)))])
    return value


def dumps(value) -> str:
    """JSON text (NaN / Infinity as Python writes them), with the deep-nesting / huge-integer markers expanded."""
    text = json.dumps(value)
    text = text.replace(json.dumps(DEEP), "[" * 20000 + "]" * 20000)
    return text.replace(json.dumps(HUGE_INT), "9" * 5000)


# --- annotation formats ------------------------------------------------------------------------------------------

RLE_A = {"size": [6, 8], "counts": "=24000a0"}
RLE_B = {"size": [6, 8], "counts": [36, 2, 4, 2, 4]}
BASE = {
    "videochat2": {"video": "clips/v1.mp4", "QA": [{"i": "Watch.", "q": "What is he doing?", "a": "Slicing."},
                                                   {"q": "With what?", "a": "A knife."}]},
    "llava": {"id": "sg-1", "video": "clips/v3.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A car turns."}]},
    "mc": {"video": "mc/v4.mp4", "question": "What colour?", "candidates": ["red", "blue", "green"], "answer": "blue"},
    "qvhighlights": {"qid": 2579, "query": "A girl cooks.", "duration": 10, "vid": "NUsG9BgSes0_210.0_220.0",
                     "relevant_windows": [[2, 6]], "relevant_clip_ids": [1, 2],
                     "saliency_scores": [[4, 3, 2], [1, 1, 0]]},
    "refcoco": {"id": "ref-1", "image": "coco/a.jpg", "expression": "the lady", "bbox": [103.9, 300, 134.2, 177.4],
                "width": 640, "height": 480},
    "track": {"id": "trk-1", "video": "tracks/t1.mp4", "width": 8, "height": 6, "fps": 24, "expression": "the ball",
              "frames": [0, 4, 8], "masks": [RLE_A, None, RLE_B]},
    "activitynet": {"v_abc": {"duration": 20.0, "timestamps": [[0.5, 5.2], [6, 25]],
                              "sentences": ["A man enters.", "He sits."]}},
    "sav": {"video_id": "sav_000001", "video_height": 6, "video_width": 8, "masklet_id": [0, 1],
            "masklet": [[RLE_A, RLE_B], [RLE_B, RLE_A]]},
    "mevis": {"videos": {"cats": {"frames": ["00000", "00001"], "expressions": {
        "0": {"exp": "the two cats", "obj_id": [0, 1], "anno_id": [10, 11]}}}}},
}
MEVIS_MASKS = {"10": [RLE_A, None], "11": [RLE_B, RLE_B]}
JSONL_FORMATS = ("videochat2", "llava", "mc", "qvhighlights", "refcoco", "track")


def _media_root(workdir: str) -> str:
    """media/ with a symlink leading out of it (link -> ../outside) and one file outside."""
    root, outside = os.path.join(workdir, "media"), os.path.join(workdir, "outside")
    os.makedirs(root, exist_ok=True)
    os.makedirs(outside, exist_ok=True)
    with open(os.path.join(outside, "x.mp4"), "wb") as f:
        f.write(b"x")
    if not os.path.lexists(os.path.join(root, "link")):
        os.symlink(outside, os.path.join(root, "link"))
    if not os.path.lexists(os.path.join(root, "escape.mp4")):
        os.symlink(os.path.join(outside, "x.mp4"), os.path.join(root, "escape.mp4"))
    return root


def _check_records(items, out: Outcome, names: tuple[str, ...], root: str) -> None:
    real_root = os.path.realpath(root)
    for item in items:
        if isinstance(item, RecordError):
            out.reject(item, *names)
            continue
        if not isinstance(item, Record):
            out.problems.append(f"iter_records yielded a {type(item).__name__}")
            continue
        out.accepted += 1
        for media in (item.video, item.image):
            if isinstance(media, str) and not os.path.realpath(media).startswith(real_root + os.sep):
                out.problems.append(f"accepted record {item.id!r} with media {media!r} outside the media root")


def _format_cases(fmt: str):
    def cases(rng, n):
        for k in range(n):
            if fmt in JSONL_FORMATS:
                entries = [mutate(BASE[fmt], rng) if rng.random() < 0.85 else BASE[fmt] for _ in range(3)]
                lines = [dumps(e) for e in entries]
                if rng.random() < 0.2:  # a raw-text mutation: cut a line, or garbage
                    j = int(rng.integers(len(lines)))
                    lines[j] = lines[j][:int(rng.integers(len(lines[j]) + 1))] if rng.random() < 0.5 else \
                        rng.integers(32, 127, 40, dtype=np.uint8).tobytes().decode()
                yield Case(f"{fmt}#{k}", "\n".join(lines) + "\n")
            elif fmt == "charades_sta":
                yield Case(f"{fmt}#{k}", _charades_case(rng))
            elif fmt == "mevis":
                yield Case(f"{fmt}#{k}", (dumps(mutate(BASE[fmt], rng)),
                                          dumps(mutate(MEVIS_MASKS, rng) if rng.random() < 0.5 else MEVIS_MASKS)))
            else:
                yield Case(f"{fmt}#{k}", dumps(mutate(BASE[fmt], rng)))
    return cases


def _charades_case(rng):
    tokens = ["AO8RW", "0.0", "6.9"]
    words = ["inf", "-inf", "nan", "Infinity", "1e400", "-5", "abc", "", "../../x", "9" * 5000, "\ud800", "12"]
    lines = []
    for _ in range(3):
        t = list(tokens)
        if rng.random() < 0.8:
            t[int(rng.integers(3))] = words[int(rng.integers(len(words)))]
        sep = "##" if rng.random() < 0.9 else " "
        lines.append(" ".join(t) + sep + ("a person opens the door" if rng.random() < 0.9 else "\ud800"))
    durations = {"AO8RW": 33.67}
    if rng.random() < 0.7:
        durations["AO8RW"] = HOSTILE[int(rng.integers(len(HOSTILE)))]
    as_csv = rng.random() < 0.5
    return "\n".join(lines) + "\n", durations, as_csv


def _run_format(fmt: str):
    from tpo_jax.data.formats import iter_records

    def run(case: Case, workdir: str) -> Outcome:
        out = Outcome()
        root = _media_root(workdir)
        options: dict[str, Any] = {}
        names: tuple[str, ...]
        if fmt == "charades_sta":
            text, durations, as_csv = case.payload
            path = os.path.join(workdir, "sta.txt")
            with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
                f.write(text)
            if as_csv:
                dpath = os.path.join(workdir, "durations.csv")
                with open(dpath, "w", encoding="utf-8", errors="surrogatepass") as f:
                    f.write("id,length\n" + "".join(f"{k},{v}\n" for k, v in durations.items()))
            else:
                dpath = os.path.join(workdir, "durations.json")
                with open(dpath, "w") as f:
                    f.write(dumps(durations))
            options["durations"] = dpath
            names = (path, dpath)
        elif fmt == "mevis":
            path = os.path.join(workdir, "meta_expressions.json")
            meta, masks = case.payload
            with open(path, "w") as f:
                f.write(meta)
            with open(os.path.join(workdir, "mask_dict.json"), "w") as f:
                f.write(masks)
            names = (path, os.path.join(workdir, "mask_dict.json"))
        else:
            ext = {"sav": "_manual.json", "activitynet": ".json"}.get(fmt, ".jsonl")
            path = os.path.join(workdir, "ann" + ext)
            with open(path, "w") as f:
                f.write(case.payload)
            names = (path,)
        try:
            _check_records(list(iter_records(path, fmt, root, **options)), out, names, root)
        except (RecordError, DataError) as e:  # the file as a whole cannot be read
            out.reject(e, *names)
        return out
    return run


# --- RLE ---------------------------------------------------------------------------------------------------------


def _rle_cases(rng, n):
    for k in range(n):
        base = RLE_A if rng.random() < 0.5 else RLE_B
        yield Case(f"rle#{k}", mutate(base, rng) if rng.random() < 0.9 else base)


def _run_rle(case: Case, workdir: str) -> Outcome:
    from tpo_jax.data import rle as R

    out = Outcome()
    try:
        mask = R.rle_decode(case.payload)
    except RecordError as e:
        out.reject(e, "RLE")
        return out
    size = case.payload["size"]
    if mask.shape != (size[0], size[1]) or mask.dtype != np.uint8:
        out.problems.append(f"decoded {mask.shape} {mask.dtype} for size {size}")
    out.accepted += 1
    return out


# --- media -------------------------------------------------------------------------------------------------------

_MEDIA_CACHE: dict[str, bytes] = {}


def _media(kind: str) -> bytes:
    """Small valid media, made once: "mp4" (6 frames 32x32), "jpeg", "png" (24x16)."""
    if kind not in _MEDIA_CACHE:
        from PIL import Image

        from tpo_jax.data.video import encode_mp4

        rng = np.random.default_rng(0)
        if kind == "mp4":
            _MEDIA_CACHE[kind] = encode_mp4(rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), 3.0, keyint=2)
        else:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(buf, format=kind.upper())
            _MEDIA_CACHE[kind] = buf.getvalue()
    return _MEDIA_CACHE[kind]


def _corrupt(data: bytes, rng) -> tuple[str, bytes]:
    from tpo_jax.data.poisoned import bomb_jpeg, bomb_png

    op = int(rng.integers(8))
    if op == 0:
        return "truncated", data[:int(rng.integers(1, len(data)))]
    if op == 1:
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 20))):
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
        return "flipped", bytes(b)
    if op == 2:
        return "garbage", rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
    if op == 3:
        return "bomb_jpeg", bomb_jpeg(int(rng.integers(5000, 65000)), int(rng.integers(5000, 65000)))
    if op == 4:
        return "bomb_png", bomb_png(int(rng.integers(7000, 2 ** 31 - 1)), int(rng.integers(7000, 2 ** 31 - 1)))
    if op == 5:
        return "empty", b""
    return "valid", data


def _media_cases(want: str):
    def cases(rng, n):
        for k in range(n):
            src = ("mp4", "jpeg", "png")[int(rng.integers(3))]
            what, data = _corrupt(_media(src), rng)
            ext = (".mp4", ".jpg", ".png", ".mkv", "")[int(rng.integers(5))]
            small = rng.random() < 0.2  # a tight budget now and then
            yield Case(f"{want}#{k}:{src}:{what}{ext}", (data, ext, small))
    return cases


def _run_media(want: str):
    def run(case: Case, workdir: str) -> Outcome:
        from tpo_jax.data.video import MediaError, decode_image, read_video_frames

        data, ext, small = case.payload
        out = Outcome()
        path = os.path.join(workdir, "media" + ext)
        with open(path, "wb") as f:
            f.write(data)
        budget = MediaBudget(max_pixels=500, max_frames=4, max_seconds=1.0) if small else MediaBudget()
        try:
            if want == "image":
                m = decode_image(path, 16, budget=budget)
                ok = m.frames.shape == (1, 16, 16, 3) and np.isfinite(m.frames).all()
            else:
                frames, idx, times, duration, fps = read_video_frames(path, 4, budget=budget)
                ok = frames.ndim == 4 and len(frames) == 4 and frames.dtype == np.uint8 and fps > 0
            out.accepted += 1
            if not ok:
                out.problems.append("accepted media of the wrong shape")
        except MediaError as e:
            out.reject(e, path)
        except RecordError as e:
            out.problems.append(f"a RecordError that is not a MediaError: {e}")
        return out
    return run


# --- the pipeline's per-record step ------------------------------------------------------------------------------

_PREP = {}


def _prepare():
    if "prep" not in _PREP:
        from tpo_jax import config as C
        from tpo_jax.data import pipeline as P
        from tpo_jax.data.synthetic import SyntheticConfig, make_record

        cfg = C.get_config("tiny")
        syn = SyntheticConfig(size=cfg.vit.img_size, num_frames=cfg.vit.num_frames)
        _PREP["spec"] = P.example_spec(P.DataConfig(), cfg)
        _PREP["records"] = {t: [make_record(syn, t, i) for i in range(3)] for t in P.TASKS}
        _PREP["P"] = P
        _PREP["prep"] = True
    return _PREP


def _record_mutation(r: Record, rng) -> tuple[str, Record]:
    from tpo_jax.data.poisoned import bomb_png, small_jpeg

    field = ["question", "options", "mc_answer", "duration", "fps", "boxes", "spans", "saliency", "track_masks",
             "frames", "video", "image", "turns", "track_boxes", "instruction", "clip_seconds"][int(rng.integers(16))]
    values = {
        "question": ["\ud800", "x" * 5000, 5, None],
        "options": [tuple(f"o{k}" for k in range(9)), ("a",), ("\ud800", "b"), (1, 2)],
        "mc_answer": [-1, 99, True, 1.5],
        "duration": [float("inf"), float("nan"), -3.0, 0.0, 1e30, "10"],
        "fps": [-5.0, float("nan"), 0.0, float("inf"), 1e-30],
        "boxes": [np.full((1, 4), np.nan), np.array([[0.5, 0.5, 0.1, 0.1]]), np.ones((2, 3)), np.array([[0, 0, 2.0, 1]])],
        "spans": [np.array([[5.0, 1.0]]), np.full((1, 2), np.inf), np.zeros((0, 2)), np.ones((9, 2))],
        "saliency": [np.array([99.0]), np.array([-1.0]), np.full(3, np.nan), np.ones((2, 2))],
        "track_masks": [[{"size": [50000, 50000], "counts": [1]}], [{"size": ["6", 8]}], "x", [None]],
        "frames": [np.zeros((4, 8, 8), np.uint8), np.zeros((0, 32, 32, 3), np.uint8), np.zeros((4, 32, 32, 3)),
                   np.zeros((3, 32, 32, 3), np.uint8)],
        "video": [small_jpeg(), b"\x00" * 100, b"", _media("mp4")[:300]],
        "image": [bomb_png(), b"garbage", _media("mp4"), b""],
        "turns": [[("\ud800", "a")], [("q",)], [], [("q", 5)]],
        "track_boxes": [np.full((4, 4), np.nan), np.ones((4, 5)), np.zeros((0, 4)), None],
        "instruction": ["\udfff", "y" * 20000],
        "clip_seconds": [0.0, -1.0, float("nan")],
    }[field]
    value = values[int(rng.integers(len(values)))]
    changes = {field: value}
    if field in ("video", "image"):  # exactly one medium
        changes.update({"frames": None, "video": None, "image": None, field: value})
    return f"{field}={str(value)[:30]!r}", dataclasses.replace(r, **changes)


def _prepare_cases(rng, n):
    env = _prepare()
    tasks = list(env["records"])
    for k in range(n):
        task = tasks[int(rng.integers(len(tasks)))]
        r = env["records"][task][int(rng.integers(3))]
        label, mutated = "none", r
        for _ in range(int(rng.integers(0, 3))):
            label, mutated = _record_mutation(mutated, rng)
        yield Case(f"prepare#{k}:{task}:{label}", (task, mutated))


class _One:
    def __init__(self, r):
        self.r = r

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.r


def _run_prepare(case: Case, workdir: str) -> Outcome:
    env = _prepare()
    P = env["P"]
    task, record = case.payload
    out = Outcome()
    prep = P.Prepare({task: _One(record)}, env["spec"], 0)
    ex = prep.example(task, 0, 0)  # must never raise
    if isinstance(ex, P.Bad):
        if ex.record_id != record.id:
            out.problems.append(f"Bad names {ex.record_id!r}, the record is {record.id!r}")
        out.reject(RecordError(ex.message), repr(record.id))
        from tpo_jax.data.records import SKIP_KINDS
        if ex.kind not in SKIP_KINDS:
            out.problems.append(f"unknown skip kind {ex.kind!r}")
        return out
    shapes = env["spec"].shapes()
    bad = [k for k, (shape, dtype) in shapes.items() if ex[k].shape != shape or ex[k].dtype != dtype]
    if bad or not np.isfinite(ex["frames"]).all():
        out.problems.append(f"accepted example with wrong / non-finite fields {bad}")
    out.accepted += 1
    return out


# --- tpo-convert: mutated tiny checkpoints (tests/fuzz_convert.py) ----------------------------------------------

def _convert_cases(rng, n):
    for k in range(n):  # each case is built in its own work folder when it runs, from its own seed
        yield Case(f"convert-{k}", int(rng.integers(2**31)))


def _run_convert(case: Case, workdir: str) -> Outcome:
    """Convert one mutated checkpoint (`tpo-convert hf`'s function). A rejection is a ConversionError naming the
    checkpoint and leaving no output; the header verdict matches the safetensors library's."""
    import random  # noqa: PLC0415

    import fuzz_convert  # noqa: PLC0415  (tests/ is on sys.path under pytest and in benchmarks/bench_fuzz.py)

    out = Outcome()
    ((name, case_dir),) = fuzz_convert.cases(random.Random(case.payload), 1, workdir)
    case.label = f"{case.label} ({name})"
    parity = fuzz_convert.library_parity(case_dir)
    if parity is not None and parity[0] != parity[1]:
        out.problems.append(f"header verdict differs from the safetensors library: ours {parity[0]}, "
                            f"library {parity[1]}")
    verdict, message = fuzz_convert.run_detailed(case_dir, os.path.join(workdir, "out"))
    if verdict == "accepted":
        out.accepted += 1
    else:
        out.reject(RuntimeError(message), str(case_dir), os.path.realpath(case_dir))
    return out


def _warm_convert(workdir: str) -> None:
    """Import what a conversion imports lazily (Orbax, TensorStore, PyTorch for `.bin`), so that the first case's
    peak allocation and time measure the case, not the imports."""
    importlib.import_module("torch")

    _run_convert(Case("warmup", 0), workdir)


# --- the registry ------------------------------------------------------------------------------------------------

FORMAT_NAMES = ("videochat2", "llava", "mc", "charades_sta", "activitynet", "qvhighlights", "refcoco", "track",
                "sav", "mevis")
FAMILIES: list[Family] = (
    [Family(f"format:{f}", _format_cases(f), _run_format(f)) for f in FORMAT_NAMES]
    + [Family("rle", _rle_cases, _run_rle),
       Family("media:image", _media_cases("image"), _run_media("image")),
       Family("media:video", _media_cases("video"), _run_media("video"), time_limit=10.0),
       Family("prepare", _prepare_cases, _run_prepare),
       Family("convert", _convert_cases, _run_convert, warmup=_warm_convert)]
)


def run_family(family: Family, n: int, seed: int = 0, workdir: str | None = None) -> list[tuple[Case, Result]]:
    """`n` cases of `family` (seeded), each in its own folder under `workdir` (a temporary one by default)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = workdir or tmp
        if family.warmup is not None:
            family.warmup(os.path.join(base, f"{family.name.replace(':', '_')}-warmup"))
        return [(case, run_case(family, case, os.path.join(base, f"{family.name.replace(':', '_')}-{k}")))
                for k, case in enumerate(family.cases(family_rng(seed, family.name), n))]


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_fuzz_family(family, tmp_path):
    results = run_family(family, CASES_PER_FAMILY, seed=0, workdir=str(tmp_path))
    failures = [f"{case.label}: {r.status}: {r.detail}" for case, r in results if r.status != "ok"]
    assert not failures, "\n".join(failures[:10])
    accepted = sum(r.outcome.accepted for _, r in results)
    rejected = sum(r.outcome.rejected for _, r in results)
    assert rejected > 0, "the mutations never produced a rejection"
    assert accepted + rejected > 0


def test_fuzz_harness_catches_what_it_must():
    """The harness itself: a foreign exception, a hang, an unnamed rejection and a big allocation are failures."""
    def boom(case, workdir):
        raise {"uncaught": KeyError("x"), "hang": None}.get(case.label) or _hang_or_other(case)

    def _hang_or_other(case):
        return IndexError("?")

    def run(case, workdir):
        if case.label == "hang":
            while True:
                time.sleep(0.01)
        if case.label == "unnamed":
            out = Outcome()
            out.reject(RecordError("something bad"), "/the/file")
            return out
        if case.label == "big":
            np.ones(20 << 20, np.uint8)
            return Outcome(accepted=1)
        return boom(case, workdir)

    fam = Family("self", lambda rng, n: iter(()), run, time_limit=0.3, peak_limit=8 << 20)
    with tempfile.TemporaryDirectory() as tmp:
        got = {label: run_case(fam, Case(label, None), tmp).status for label in ("uncaught", "hang", "unnamed", "big")}
    assert got == {"uncaught": "uncaught", "hang": "hang", "unnamed": "problem", "big": "over_memory"}
