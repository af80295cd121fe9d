"""Parsers of the real-data annotation formats → `Record`s (see docs/data.md for a tiny example of each).

`iter_records(path, fmt, media_root, **options)` yields, per entry, either a validated `Record` or the
`RecordError` of a bad entry (named `file:line` for line-based files, `file[i]` for JSON lists), so the
caller can skip and count. A file that cannot be read at all (missing, not JSON) raises `RecordError`.

| fmt            | input                                                                    | task         |
|----------------|--------------------------------------------------------------------------|--------------|
| `videochat2`   | JSON list / JSONL of {"video" or "image", "QA": [{"i", "q", "a"}]}        | conversation |
| `llava`        | JSON list / JSONL of {"video" or "image", "conversations": [{"from", "value"}]} | conversation |
| `mc`           | JSON list / JSONL of {"video", "question", "candidates", "answer"}        | mc           |
| `charades_sta` | text lines `vid start end##query`, plus `durations` (dict / CSV / JSON)   | temporal     |
| `activitynet`  | JSON {vid: {"duration", "timestamps", "sentences"}}                      | temporal     |
| `qvhighlights` | JSONL {qid, query, vid, duration, relevant_windows, relevant_clip_ids, saliency_scores} | temporal |
| `refcoco`      | JSONL {image, expression(s), bbox (pixels, xywh), width, height}         | region       |
| `track`        | JSONL, one object track: {video, width, height, masks and/or boxes per annotated frame} | mask |
| `sav`          | SA-V `*_manual.json` (a file or a folder of them): one record per masklet | mask         |
| `mevis`        | MeViS `meta_expressions.json` (+ `mask_dict.json` beside it)             | mask         |

Temporal records get ids "<video id>#<n>" (the query's number or qid): the part before "#" names the video
(`tpo_jax.data.conversation.video_key`), also after `tpo-build-data` stored the media without its path.

Media paths are joined to `media_root` and must stay inside it once resolved (no `..`, no absolute path and
no symlink leading outside; `allow_outside_media_root=True` lifts this); files are not opened here
(`tpo_jax.data.video.load_media` raises `MediaError` for missing or corrupt media) except to read an image's
size when a `refcoco` entry has no width/height.

Hostile input: numbers must be JSON numbers (not strings, not booleans), finite, in range (durations and fps
> 0, boxes inside the frame, saliency scores 0-4); sizes that would be allocated (RLE size, track width ×
height, saliency clips = duration / clip_seconds, durations) are checked against `MediaBudget` first; any
exception while parsing one entry (deep nesting, a 5,000-digit integer, a library error) is that entry's
RecordError, with a `kind` (`tpo_jax.data.records.SKIP_KINDS`).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import reprlib
from typing import Any, Callable, Iterator

import numpy as np

from tpo_jax.data import rle as R
from tpo_jax.data.records import (DEFAULT_BUDGET, MAX_OPTIONS, MediaBudget, Record, RecordError, as_record_error,
                                   finite_number)

_MISSING = object()


class _Bad(Exception):
    """Internal: a bad field in one entry (turned into a RecordError naming the file and line)."""

    def __init__(self, message: str, kind: str = "bad_field"):
        super().__init__(message)
        self.kind = kind


_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel, _repr.maxlist, _repr.maxdict = 60, 60, 3, 6, 4


def _short(value) -> str:
    """A bounded repr (deeply nested or huge values stay one short line)."""
    try:
        return _repr.repr(value)
    except (RecursionError, ValueError):
        return f"<{type(value).__name__}>"


class MediaRoot:
    """Where the media paths of an annotation file may point: joined to `root` and, resolved (symlinks
    followed), inside it, unless `allow_outside` (then also absolute paths are kept as given). Without a
    root, paths are used as given. Carries the `MediaBudget` the parsers check sizes against."""

    def __init__(self, root: str | os.PathLike | None, allow_outside: bool = False,
                 budget: MediaBudget | None = None):
        self.root = None if root is None else os.fspath(root)
        self.real = None if root is None else os.path.realpath(self.root)
        self.allow_outside, self.budget = bool(allow_outside), budget or DEFAULT_BUDGET

    def path(self, rel: str) -> str:
        if not isinstance(rel, str) or not rel:
            raise _Bad("empty media path")
        if "\x00" in rel:
            raise _Bad(f"media path {_short(rel)} holds a NUL character", "path")
        if self.root is None:
            return rel
        if os.path.isabs(rel):
            if self.allow_outside:
                return rel
            joined = rel
        else:
            joined = os.path.join(self.root, rel)
        if not self.allow_outside:
            real = os.path.realpath(joined)
            if not (real == self.real or real.startswith(self.real.rstrip(os.sep) + os.sep)):
                raise _Bad(f"media path {_short(rel)} resolves to {real}, outside the media root {self.root} "
                           "(allow_outside_media_root=True to allow)", "path")
        return joined


def _get(entry: dict, key: str, types, default: Any = _MISSING):
    """entry[key] of `types` (bool is not an int), `default` when missing / null (no default: _Bad)."""
    if not isinstance(entry, dict):
        raise _Bad(f"entry must be a JSON object, got {type(entry).__name__}")
    if key not in entry or entry[key] is None:
        if default is _MISSING:
            raise _Bad(f"missing field {key!r}")
        return default
    value = entry[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _Bad(f"field {key!r} must be {_type_names(types)}, got bool")
    if not isinstance(value, types):
        raise _Bad(f"field {key!r} must be {_type_names(types)}, got {type(value).__name__} {_short(value)}")
    return value


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def _first_key(entry: dict, keys: tuple[str, ...], types) -> tuple[str, Any]:
    for k in keys:
        if isinstance(entry, dict) and entry.get(k) is not None:
            return k, _get(entry, k, types)
    raise _Bad(f"missing field {' / '.join(repr(k) for k in keys)}")


def _media_path(media_root: MediaRoot, rel: str) -> str:
    return media_root.path(rel)


def _number(value, what: str, *, positive: bool = False, minimum: float | None = None) -> float:
    """A JSON number (int or float; not a string, not a bool), finite, in range."""
    try:
        return finite_number(value, what, positive=positive, minimum=minimum)
    except RecordError as e:
        raise _Bad(str(e)) from None


def _text_number(text: str, what: str, *, minimum: float | None = None) -> float:
    """A number written in a text file (Charades-STA lines, CSV cells): parsed, then finite and in range."""
    try:
        x = float(text)
    except (TypeError, ValueError):
        raise _Bad(f"{what} {_short(text)} is not a number") from None
    return _number(x, what, minimum=minimum)


def _seconds(value, what: str, budget: MediaBudget) -> float:
    """A positive finite duration within `budget.max_seconds`."""
    x = _number(value, what, positive=True)
    if x > budget.max_seconds:
        raise _Bad(f"{what} {x} s is over the budget max_seconds={budget.max_seconds}", "media_budget")
    return x


# --- reading entries -------------------------------------------------------------------------------------------


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise RecordError(f"{path}: annotation file not found")


def _load_json(path: str):
    _check_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})", "parse") from None
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not UTF-8 text ({e.reason})", "parse") from None
    except RecursionError:
        raise RecordError(f"{path}: not usable JSON (nested too deeply)", "parse") from None
    except ValueError as e:  # e.g. an integer over Python's digit limit
        raise RecordError(f"{path}: not usable JSON ({str(e)[:100]})", "parse") from None


def _json_entries(path: str) -> Iterator[tuple[str, Any]]:
    """(location, entry) of a JSONL file (one object per line) or a JSON list; a bad line → (loc, RecordError)."""
    if path.endswith(".jsonl"):
        _check_file(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                loc = f"{path}:{lineno}"
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    yield loc, RecordError(f"{loc}: not valid JSON ({e.msg}, column {e.colno})", "parse")
                    continue
                except RecursionError:
                    yield loc, RecordError(f"{loc}: not usable JSON (nested too deeply)", "parse")
                    continue
                except ValueError as e:  # e.g. an integer over Python's digit limit
                    yield loc, RecordError(f"{loc}: not usable JSON ({str(e)[:100]})", "parse")
                    continue
                yield loc, entry
        return
    data = _load_json(path)
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        yield f"{path}[{i}]", entry


def _run(entries: Iterator[tuple[str, Any]], parse: Callable[[str, Any], Iterator[Record]]):
    """Parse every entry; yield validated Records, or one RecordError (named by location) per bad entry."""
    for loc, entry in entries:
        if isinstance(entry, RecordError):
            yield entry
            continue
        try:
            records = list(parse(loc, entry))
            for r in records:
                r.validate()
        except _Bad as e:
            yield RecordError(f"{loc}: {e}", e.kind)
            continue
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001  (any library error of one entry is that entry's error)
            err = as_record_error(e, loc, kind="bad_field")
            if not isinstance(e, RecordError):
                err = RecordError(str(err).replace(f"{loc}: ", f"{loc}: malformed entry (", 1) + ")", err.kind)
            yield err
            continue
        yield from records


def _default_id(loc: str) -> str:
    base = os.path.basename(loc)
    return base.replace(".jsonl:", "-").replace(".json[", "-").replace(".txt:", "-").rstrip("]")


def _entry_id(e: dict, loc: str) -> str:
    """The entry's "id" (a string or an integer), else `<file stem>-<index>`."""
    rid = e.get("id")
    if rid is None:
        return _default_id(loc)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise _Bad(f"field 'id' must be str or int, got {type(rid).__name__} {_short(rid)}")
    return str(rid)


def _media_fields(entry: dict, media_root: str | None) -> dict:
    key, rel = _first_key(entry, ("video", "image"), str)
    return {key: _media_path(media_root, rel)}


# --- conversations and multiple choice -------------------------------------------------------------------------


def _videochat2(path, media_root, **_):
    """VideoChat2-IT: {"video"|"image", "QA": [{"i": instruction, "q": question, "a": answer}]}.

    The first turn's instruction `i` becomes `Record.instruction` (the conversation builder places it
    before the first `[INST]`, MODEL-SPEC §4.3); later turns' `i` are ignored. A turn needs a question
    `q`, except the first one when it has an instruction (the question is then empty)."""
    def parse(loc, e):
        qa = _get(e, "QA", list)
        if not qa:
            raise _Bad("'QA' is empty")
        turns, instruction = [], ""
        for k, turn in enumerate(qa):
            if not isinstance(turn, dict):
                raise _Bad(f"QA[{k}] must be an object")
            q, a = _get(turn, "q", str, "").strip(), _get(turn, "a", str)
            if k == 0:
                instruction = _get(turn, "i", str, "").strip()
            if not q and not (k == 0 and instruction):
                raise _Bad(f"QA[{k}] has neither a question 'q' nor an instruction 'i'")
            turns.append((q, a.strip()))
        yield Record(id=_entry_id(e, loc), task="conversation", turns=turns,
                     instruction=instruction, **_media_fields(e, media_root))
    return _run(_json_entries(path), parse)


_MEDIA_TAGS = ("<video>", "<image>")


def _llava(path, media_root, **_):
    """LLaVA / ShareGPT style: {"video"|"image", "conversations": [{"from": "human"|"gpt", "value"}]}."""
    def parse(loc, e):
        conv = _get(e, "conversations", list)
        if len(conv) < 2 or len(conv) % 2:
            raise _Bad(f"'conversations' must hold human/gpt pairs, got {len(conv)} messages")
        turns = []
        for k in range(0, len(conv), 2):
            h, g = conv[k], conv[k + 1]
            if not (isinstance(h, dict) and isinstance(g, dict)):
                raise _Bad(f"conversations[{k}] must be objects")
            if h.get("from") not in ("human", "user") or g.get("from") not in ("gpt", "assistant"):
                raise _Bad(f"conversations[{k}:{k + 2}] must be from human then gpt, "
                           f"got {h.get('from')!r}, {g.get('from')!r}")
            q = _get(h, "value", str)
            for tag in _MEDIA_TAGS:
                q = q.replace(tag, "")
            turns.append((q.strip(), _get(g, "value", str).strip()))
        yield Record(id=_entry_id(e, loc), task="conversation", turns=turns,
                     **_media_fields(e, media_root))
    return _run(_json_entries(path), parse)


def _mc(path, media_root, **_):
    """Multiple choice (MVBench style): {"video", "question", "candidates": [...], "answer": text or index}."""
    def parse(loc, e):
        options = _get(e, "candidates", list)
        if len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise _Bad(f"'candidates' must be a list of >= 2 strings, got {_short(options)}")
        if len(options) > MAX_OPTIONS:
            raise _Bad(f"{len(options)} candidates, a multiple-choice prompt takes at most {MAX_OPTIONS} "
                       "(options (A) to (H))", "template")
        answer = _get(e, "answer", (str, int))
        if isinstance(answer, int):
            if not 0 <= answer < len(options):
                raise _Bad(f"answer index {answer} not in [0, {len(options)})")
            index = answer
        elif answer in options:
            index = options.index(answer)
        else:
            raise _Bad(f"answer {answer!r} is not one of the candidates {_short(options)}")
        yield Record(id=_entry_id(e, loc), task="mc", question=_get(e, "question", str).strip(),
                     options=tuple(options), mc_answer=index, **_media_fields(e, media_root))
    return _run(_json_entries(path), parse)


# --- temporal grounding ----------------------------------------------------------------------------------------


def _duration_entry(value, where: str, budget: MediaBudget, text: bool) -> float | str:
    """One durations-table entry: seconds, or the reason it is bad (a bad entry spoils only its video)."""
    try:
        return _seconds(_text_number(value, "duration") if text else value, "duration", budget)
    except _Bad as e:
        return f"{where}: {e}"


def _load_durations(source, budget: MediaBudget = DEFAULT_BUDGET) -> dict[str, float | str]:
    """Video durations in seconds from a dict, a JSON {vid: seconds} or a CSV with columns id + length/duration.
    A bad entry (not a finite positive number, over the budget) maps its video to the reason (a string): the
    lines of that video are bad records, the others are read."""
    if isinstance(source, dict):
        return {str(k): _duration_entry(v, f"durations[{k!r}]", budget, isinstance(v, str)) for k, v in source.items()}
    if source is None:
        raise RecordError("charades_sta needs durations=<dict | JSON | CSV with id and length columns>")
    path = os.fspath(source)
    if path.endswith(".json"):
        data = _load_json(path)
        if not isinstance(data, dict):
            raise RecordError(f"{path}: expected a JSON object {{video id: seconds}}")
        return {str(k): _duration_entry(v, f"{path}[{k!r}]", budget, False) for k, v in data.items()}
    _check_file(path)
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            col = next((c for c in ("length", "duration") if c in fields), None)
            if "id" not in fields or col is None:
                raise RecordError(f"{path}: durations CSV needs columns 'id' and 'length' (or 'duration'), "
                                  f"got {fields}")
            out: dict[str, float | str] = {}
            for lineno, row in enumerate(reader, 2):
                if row.get("id") is not None:
                    out[row["id"]] = _duration_entry(row.get(col), f"{path}:{lineno}", budget, True)
            return out
    except csv.Error as e:
        raise RecordError(f"{path}: not a readable CSV ({e})", "parse") from None


def _clip_span(start: float, end: float, duration: float) -> list[float]:
    """A span in seconds inside [0, duration]: the end is clipped to the duration; start must lie inside."""
    if not (math.isfinite(start) and math.isfinite(end) and math.isfinite(duration) and duration > 0):
        raise _Bad(f"span [{start}, {end}] of a video of duration {duration}: must be finite, duration > 0")
    if start < 0 or end < start:
        raise _Bad(f"span [{start}, {end}] must have 0 <= start <= end")
    if start >= duration:
        raise _Bad(f"span [{start}, {end}] starts after the video's duration {duration}")
    return [start, min(end, duration)]


def _charades_sta(path, media_root, durations=None, video_ext=".mp4", **_):
    """Charades-STA lines `vid start end##query`; the end is clipped to the video's duration."""
    table = _load_durations(durations, media_root.budget)
    _check_file(path)

    def entries():
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{lineno}", line.rstrip("\n")

    def parse(loc, line):
        head, sep, query = line.partition("##")
        parts = head.split()
        if not sep or len(parts) != 3 or not query.strip():
            raise _Bad(f"expected 'vid start end##query', got {line[:80]!r}")
        vid = parts[0]
        start, end = _text_number(parts[1], "start"), _text_number(parts[2], "end")
        if vid not in table:
            raise _Bad(f"no duration for video {vid!r}")
        duration = table[vid]
        if isinstance(duration, str):
            raise _Bad(f"bad duration of video {vid!r} ({duration})")
        yield Record(id=f"{vid}#{_default_id(loc)}", task="temporal", video=_media_path(media_root, vid + video_ext),
                     question=query.strip(), duration=duration,
                     spans=np.array([_clip_span(start, end, duration)], np.float64))
    return _run(entries(), parse)


def _activitynet(path, media_root, video_ext=".mp4", **_):
    """ActivityNet Captions: {vid: {"duration", "timestamps": [[s, e], ...], "sentences": [...]}}, one record
    per sentence; ends clipped to the duration."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise RecordError(f"{path}: expected a JSON object {{video id: annotation}}")

    def entries():
        for vid, entry in data.items():
            yield f"{path}[{vid}]", (vid, entry)

    def parse(loc, item):
        vid, e = item
        duration = _seconds(_get(e, "duration", (int, float)), "duration", media_root.budget)
        stamps, sentences = _get(e, "timestamps", list), _get(e, "sentences", list)
        if len(stamps) != len(sentences):
            raise _Bad(f"{len(stamps)} timestamps but {len(sentences)} sentences")
        for k, (span, sentence) in enumerate(zip(stamps, sentences)):
            if not (isinstance(span, list) and len(span) == 2) or not isinstance(sentence, str):
                raise _Bad(f"timestamps[{k}] must be [start, end] with a sentence string")
            s = _clip_span(_number(span[0], "start"), _number(span[1], "end"), duration)
            yield Record(id=f"{vid}#{k}", task="temporal", video=_media_path(media_root, vid + video_ext),
                         question=sentence.strip(), duration=duration, spans=np.array([s], np.float64))
    return _run(entries(), parse)


def _qvhighlights(path, media_root, video_ext=".mp4", clip_seconds=2.0, saliency_reduce="sum", **_):
    """QVHighlights JSONL. Saliency per `clip_seconds` clip: the annotators' 0-4 scores summed (0-12, the
    Moment-DETR / CG-DETR convention and the scale every temporal source uses: the saliency loss's rank levels
    assume it; `saliency_reduce="mean"` keeps 0-4, for other uses); 0 outside `relevant_clip_ids`."""
    if saliency_reduce not in ("sum", "mean"):
        raise RecordError(f"saliency_reduce must be 'sum' or 'mean', got {saliency_reduce!r}")
    if isinstance(clip_seconds, bool) or not isinstance(clip_seconds, (int, float)) or not clip_seconds > 0 \
            or not math.isfinite(clip_seconds):
        raise RecordError(f"clip_seconds must be a positive number, got {clip_seconds!r}")

    def parse(loc, e):
        vid, query = _get(e, "vid", str), _get(e, "query", str)
        duration = _seconds(_get(e, "duration", (int, float)), "duration", media_root.budget)
        windows = _get(e, "relevant_windows", list)
        if not windows:
            raise _Bad("'relevant_windows' is empty (a test-split line without labels?)")
        spans = []
        for k, w in enumerate(windows):
            if not (isinstance(w, list) and len(w) == 2):
                raise _Bad(f"relevant_windows[{k}] must be [start, end], got {w!r}")
            spans.append(_clip_span(_number(w[0], "start"), _number(w[1], "end"), duration))
        clip_ids = _get(e, "relevant_clip_ids", list, [])
        scores = _get(e, "saliency_scores", list, [])
        if len(clip_ids) != len(scores):
            raise _Bad(f"{len(clip_ids)} relevant_clip_ids but {len(scores)} saliency_scores")
        num_clips = int(math.ceil(duration / clip_seconds - 1e-6))
        if num_clips > media_root.budget.max_clips:
            raise _Bad(f"duration {duration} s is {num_clips} clips of {clip_seconds} s, over the budget "
                       f"max_clips={media_root.budget.max_clips}", "media_budget")
        saliency = np.zeros(num_clips, np.float32)
        for cid, s in zip(clip_ids, scores):
            if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid < num_clips:
                raise _Bad(f"relevant clip id {cid!r} not in [0, {num_clips}) for duration {duration}")
            if not isinstance(s, list) or not s:
                raise _Bad(f"saliency_scores of clip {cid} must be a list of annotator scores, got {s!r}")
            if len(s) > 16:
                raise _Bad(f"saliency_scores of clip {cid}: {len(s)} annotator scores (at most 16)")
            values = [_number(x, "saliency score") for x in s]
            if any(not 0 <= v <= 4 for v in values):
                raise _Bad(f"saliency_scores of clip {cid} must be annotator scores 0-4, got {_short(s)}")
            saliency[cid] = sum(values) / (len(values) if saliency_reduce == "mean" else 1)
        qid = e.get("qid", _default_id(loc))
        if isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise _Bad(f"field 'qid' must be str or int, got {_short(qid)}")
        yield Record(id=f"{vid}#{qid}", task="temporal", video=_media_path(media_root, vid + video_ext),
                     question=query.strip(), duration=duration, spans=np.array(spans, np.float64),
                     saliency=saliency, clip_seconds=float(clip_seconds))
    return _run(_json_entries(path), parse)


# --- spatial grounding -----------------------------------------------------------------------------------------


def _image_size(path: str, budget: MediaBudget) -> tuple[int, int]:
    from tpo_jax.data.video import image_size  # noqa: PLC0415  (PIL / PyAV only when an entry lacks width/height)
    try:
        return image_size(path, budget=budget)
    except RecordError as e:
        raise _Bad(f"no width/height given and the image size cannot be read: {e}", e.kind) from None


def normalise_box(box, width: float, height: float, box_format: str = "xywh", tolerance: float = 1.0) -> list[float]:
    """A pixel box → normalised xyxy in [0, 1]. Overshoot up to `tolerance` pixels is clipped; beyond that,
    or an empty box, is an error (a box outside the frame)."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4):
        raise _Bad(f"box must be 4 numbers, got {_short(box)}")
    x0, y0, a, b = (_number(v, "box coordinate") for v in box)
    if box_format == "xywh":
        x1, y1 = x0 + a, y0 + b
    elif box_format == "xyxy":
        x1, y1 = a, b
    else:
        raise _Bad(f"box_format must be 'xywh' or 'xyxy', got {box_format!r}")
    if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
        raise _Bad(f"image width/height must be finite and positive, got {width}x{height}")
    if x1 <= x0 or y1 <= y0:
        raise _Bad(f"empty box {box} ({box_format})")
    if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
        raise _Bad(f"box {box} ({box_format}) outside the {width}x{height} frame")
    return [min(max(x0, 0.0), width) / width, min(max(y0, 0.0), height) / height,
            min(max(x1, 0.0), width) / width, min(max(y1, 0.0), height) / height]


def _refcoco(path, media_root, box_format="xywh", **_):
    """RefCOCO-style JSONL: {"image", "expression" (str) or "expressions"/"sentences" (list), "bbox", "width",
    "height"}; one record per expression, box normalised to xyxy."""
    def parse(loc, e):
        image = _media_path(media_root, _get(e, "image", str))
        _, expr = _first_key(e, ("expression", "expressions", "sentences"), (str, list))
        exprs = [expr] if isinstance(expr, str) else expr
        if not exprs or not all(isinstance(x, str) and x.strip() for x in exprs):
            raise _Bad(f"expressions must be non-empty strings, got {expr!r}")
        if "width" in e or "height" in e:
            width = _number(_get(e, "width", (int, float)), "width", positive=True)
            height = _number(_get(e, "height", (int, float)), "height", positive=True)
        else:
            width, height = _image_size(image, media_root.budget)
        box = normalise_box(_get(e, "bbox", list), width, height, box_format)
        base = _entry_id(e, loc)
        for k, x in enumerate(exprs):
            yield Record(id=base if len(exprs) == 1 else f"{base}_{k}", task="region", image=image,
                         question=x.strip(), boxes=np.array([box], np.float64), box_frames=np.zeros(1, np.int64))
    return _run(_json_entries(path), parse)


# --- tracking / segmentation -----------------------------------------------------------------------------------


def _track_record(rid: str, media: dict, masks: list | None, boxes: list | None, frames: list[int],
                  width: float, height: float, question: str = "", fps: float | None = None,
                  budget: MediaBudget = DEFAULT_BUDGET) -> Record:
    """A mask-task Record from per-frame RLEs (None = object absent) and/or pixel xywh boxes.

    Boxes come from the masks when given (tight box), else from `boxes`; `box_frames` holds the source frame
    index of each entry; absent frames get a zero box, `track_visible` False and an all-zero RLE."""
    n = len(masks) if masks is not None else len(boxes)
    if masks is not None and boxes is not None and len(boxes) != n:
        raise _Bad(f"{n} masks but {len(boxes)} boxes")
    if len(frames) != n:
        raise _Bad(f"{n} annotated entries but {len(frames)} frame indices")
    if n == 0:
        raise _Bad("track has no annotated frames")
    if any(b > a for a, b in zip(frames[1:], frames[:-1])):
        raise _Bad("frame indices must be increasing")
    if n > budget.max_frames:
        raise _Bad(f"{n} annotated entries, over the budget max_frames={budget.max_frames}", "media_budget")
    if not (width >= 1 and height >= 1):
        raise _Bad(f"width / height must be >= 1 pixel, got {width}x{height}")
    h, w = int(height), int(width)
    if h * w > budget.max_mask_pixels:
        raise _Bad(f"frame of {w}x{h} = {w * h} pixels is over the budget max_mask_pixels={budget.max_mask_pixels}",
                   "media_budget")
    track_boxes = np.zeros((n, 4), np.float64)
    visible = np.zeros(n, bool)
    rles = []
    for k in range(n):
        if masks is not None:
            m = masks[k]
            if m is None:
                rles.append(R.rle_encode(np.zeros((h, w), bool)))
                continue
            if not isinstance(m, dict):
                raise _Bad(f"mask {k} must be an RLE object, got {type(m).__name__}")
            if R.rle_size(m, budget) != (h, w):
                raise _Bad(f"mask {k} has size {R.rle_size(m, budget)}, the video is {h}x{w}")
            box = R.mask_to_box(R.rle_decode(m, budget))
            rles.append(m)
            if box is None:
                continue
            track_boxes[k] = box / np.array([w, h, w, h], np.float64)
        else:
            if boxes[k] is None:
                continue
            track_boxes[k] = normalise_box(boxes[k], width, height, "xywh")
        visible[k] = True
    if not visible.any():
        raise _Bad("the object is not visible in any annotated frame")
    return Record(id=rid, task="mask", question=question, track_boxes=track_boxes, track_visible=visible,
                  track_masks=rles if masks is not None else None, box_frames=np.asarray(frames, np.int64),
                  fps=fps, **media)


def _track(path, media_root, **_):
    """Generic track JSONL: {"video" (file or frame folder), "width", "height", optional "fps", "expression",
    "frames" (source frame index per entry; default 0, 1, ...), "masks" (RLE or null per entry) and/or
    "boxes" (pixel xywh or null per entry)}."""
    def parse(loc, e):
        masks, boxes = _get(e, "masks", list, None), _get(e, "boxes", list, None)
        if masks is None and boxes is None:
            raise _Bad("needs 'masks' or 'boxes'")
        n = len(masks) if masks is not None else len(boxes)
        frames = _get(e, "frames", list, list(range(n)))
        if not all(isinstance(f, int) and not isinstance(f, bool) and f >= 0 for f in frames):
            raise _Bad(f"'frames' must be non-negative integers, got {frames[:8]!r}")
        width = _number(_get(e, "width", (int, float)), "width", positive=True)
        height = _number(_get(e, "height", (int, float)), "height", positive=True)
        fps = e.get("fps")
        yield _track_record(_entry_id(e, loc), _media_fields(e, media_root), masks, boxes, frames,
                            width, height, _get(e, "expression", str, "").strip(),
                            None if fps is None else _number(fps, "fps", positive=True), media_root.budget)
    return _run(_json_entries(path), parse)


def _sav(path, media_root, frame_stride=4, video_ext=".mp4", **_):
    """SA-V `*_manual.json`: "masklet" [annotated frame][object] RLEs, annotated every `frame_stride`-th
    video frame (6 fps of 24 fps videos); one record per masklet, video `<video_id>.mp4`, no expression."""
    files = sorted(glob.glob(os.path.join(path, "*_manual.json"))) if os.path.isdir(path) else [path]
    if not files:
        raise RecordError(f"{path}: no *_manual.json files")

    def entries():
        for f in files:
            data = _load_json(f)
            if not isinstance(data, dict):
                yield f, RecordError(f"{f}: expected an SA-V annotation object")
                continue
            yield f, data

    def parse(loc, e):
        vid = _get(e, "video_id", str)
        height = _number(_get(e, "video_height", (int, float)), "video_height", positive=True)
        width = _number(_get(e, "video_width", (int, float)), "video_width", positive=True)
        masklet = _get(e, "masklet", list)
        if not masklet or not all(isinstance(fr, list) for fr in masklet):
            raise _Bad("'masklet' must be a non-empty list (frames) of lists (objects)")
        n_obj = {len(fr) for fr in masklet}
        if len(n_obj) != 1:
            raise _Bad(f"annotated frames hold different numbers of masklets {sorted(n_obj)}")
        ids = _get(e, "masklet_id", list, list(range(n_obj.pop())))
        if len(ids) != len(masklet[0]):
            raise _Bad(f"{len(ids)} masklet ids for {len(masklet[0])} masklets")
        frames = [k * int(frame_stride) for k in range(len(masklet))]
        video = {"video": _media_path(media_root, vid + video_ext)}
        for j, mid in enumerate(ids):
            masks = [fr[j] for fr in masklet]
            yield _track_record(f"{vid}_{mid}", video, masks, None, frames, width, height, budget=media_root.budget)
    return _run(entries(), parse)


def _mevis(path, media_root, mask_dict=None, fps=6.0, **_):
    """MeViS `meta_expressions.json` {"videos": {vid: {"expressions": {eid: {"exp", "anno_id"}}, "frames"}}}
    with `mask_dict.json` {anno_id: [RLE or null per frame]} (default: beside the meta file); media is the
    frame folder `<media_root>/<vid>`; masks of an expression's several objects are merged."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (math.isfinite(fps) and fps > 0):
        raise RecordError(f"mevis fps must be a positive number, got {fps!r}")
    fps = float(fps)
    meta = _load_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("videos"), dict):
        raise RecordError(f"{path}: expected {{\"videos\": {{...}}}}")
    mask_path = os.fspath(mask_dict or os.path.join(os.path.dirname(path), "mask_dict.json"))
    masks_all = _load_json(mask_path)
    if not isinstance(masks_all, dict):
        raise RecordError(f"{mask_path}: expected an object {{anno_id: [RLE per frame]}}")

    def entries():
        for vid, v in meta["videos"].items():
            exprs = v.get("expressions") if isinstance(v, dict) else None
            if not isinstance(exprs, dict):
                yield f"{path}[{vid}]", RecordError(f"{path}[{vid}]: missing 'expressions'")
                continue
            for eid, e in exprs.items():
                yield f"{path}[{vid}/{eid}]", (vid, eid, v, e)

    def parse(loc, item):
        vid, eid, v, e = item
        frames = _get(v, "frames", list)
        anno_ids = _get(e, "anno_id", list)
        if not anno_ids:
            raise _Bad("'anno_id' is empty")
        per_object = []
        for a in anno_ids:
            if str(a) not in masks_all:
                raise _Bad(f"anno_id {a} not in the mask dict")
            m = masks_all[str(a)]
            if not isinstance(m, list) or len(m) != len(frames):
                raise _Bad(f"anno_id {a}: expected {len(frames)} per-frame masks")
            per_object.append(m)
        present = [[o[k] for o in per_object if o[k] is not None] for k in range(len(frames))]
        sizes = {tuple(R.rle_size(m, media_root.budget)) for ms in present for m in ms}
        if len(sizes) != 1:
            raise _Bad(f"masks of sizes {sorted(sizes)} (need one size, and at least one mask)")
        h, w = sizes.pop()
        masks = [None if not ms else (ms[0] if len(ms) == 1 else R.rle_union(ms)) for ms in present]
        yield _track_record(f"{vid}_{eid}", {"video": _media_path(media_root, vid)}, masks, None,
                            list(range(len(frames))), w, h, _get(e, "exp", str).strip(), fps, media_root.budget)
    return _run(entries(), parse)


FORMATS: dict[str, Callable] = {
    "videochat2": _videochat2, "llava": _llava, "mc": _mc, "charades_sta": _charades_sta,
    "activitynet": _activitynet, "qvhighlights": _qvhighlights, "refcoco": _refcoco, "track": _track,
    "sav": _sav, "mevis": _mevis,
}


def iter_records(path: str | os.PathLike, fmt: str, media_root: str | os.PathLike | None = None, *,
                 allow_outside_media_root: bool = False, budget: MediaBudget | None = None,
                 **options) -> Iterator[Record | RecordError]:
    """Records of an annotation file: a validated `Record` per good entry, the `RecordError` of each bad one.

    Options: charades_sta `durations` (dict | JSON | CSV), `video_ext` (".mp4"); qvhighlights `clip_seconds`
    (2.0), `saliency_reduce` ("sum" | "mean"); refcoco `box_format` ("xywh" | "xyxy"); sav `frame_stride` (4);
    mevis `mask_dict` (path), `fps` (6.0).
    Every format: `allow_outside_media_root` (False: a media path that resolves outside `media_root` is a bad
    record of kind "path"), `budget` (`MediaBudget`: sizes checked before allocating; default `DEFAULT_BUDGET`,
    whose `allow_outside_media_root` is also honoured).
    Raises RecordError when the file itself cannot be read or `fmt` is unknown.
    """
    if fmt not in FORMATS:
        raise RecordError(f"unknown annotation format {fmt!r}; known: {sorted(FORMATS)}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise RecordError(f"{path}: annotation file not found")
    budget = budget or DEFAULT_BUDGET
    root = MediaRoot(media_root, allow_outside_media_root or budget.allow_outside_media_root, budget)
    return FORMATS[fmt](os.fspath(path), root, **options)


def read_records(path, fmt: str, media_root=None, **options) -> tuple[list[Record], list[RecordError]]:
    """All records of a file, split into the good ones and the errors of the bad ones."""
    good, bad = [], []
    for r in iter_records(path, fmt, media_root, **options):
        (bad if isinstance(r, RecordError) else good).append(r)
    return good, bad


__all__ = ["FORMATS", "MediaRoot", "iter_records", "read_records", "normalise_box"]
