"""Starting a run from pretrained weights: the run config's `init_from` (`tpo-train --init-from PATH`).

    sources = resolve_sources(cfg.init_from)                     # checks paths and kinds; reads metadata only
    plan = plan_init(sources, shapes)                             # which source gives each parameter; checks shapes
    params, frozen = load_init(plan, params, frozen)              # each tensor read straight into its shards
    plan.report                                                   # loaded / initialised, per source and group

A source is one of
* a converted VideoChat-TPO checkpoint (`tpo-convert videochat`: `conversion.json` + `params/`), whole or a
  part of the model (e.g. only the vision encoder and connector);
* a converted Hugging Face LLM (`tpo-convert hf`, optionally with its PEFT adapter kept or merged): the `llm.`
  parameters. A vocabulary short by exactly the 7 TPO task tokens (a plain Mistral / Llama) is extended: the
  new rows of the input embedding and of the lm_head are the mean of the old rows (MODEL-SPEC §3.3);
* a converted Hugging Face LLaVA-OneVision checkpoint (`tpo-convert llava_ov`): the base weights `vision.*`
  (SigLIP tower, projector, image_newline) and `llm.*` of a model of arch "llava_ov"; LoRA, task tokens, heads
  and SAM2 keep their initialisation;
* a `tpo-train` work directory (`config.json` + `<stage>/checkpoints/`): its own `init_from` sources, then the
  parameters its last stage checkpoint holds (every group trained so far), i.e. the whole model that run had.

Sources merge in order: a parameter comes from the LAST source that has it, so a later source overrides an
earlier one (the released model, then a fine-tuned LLM). What no source has keeps its `seed` initialisation
(new task tokens, heads). Stack layouts may differ (a per-layer checkpoint into a scanned model and back).

Loading never holds an unsharded copy of the model: every parameter is restored into the sharding (and the
storage dtype: bf16 frozen weights stay bf16) of the train state it replaces, one device shard at a time, each
process reading only the shards of its own devices, also from the other stack layout
(`checkpoints.orbax_io.load_params(sequential=True)`); a
vocabulary-extended table is read in blocks of rows for its mean, then shard by shard.

Errors are `ConfigError`s naming the source and the tensor: a missing path, a directory of another kind, a
tensor whose shape does not fit (both shapes; a vocabulary of another size says so), a source that covers none
of the model's parameters, or an unreadable (e.g. truncated) file.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from tpo_jax.checkpoints.configs import REPORT_FILE, model_config, read_report
from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.orbax_io import ArrayReader, _flat_state, load_params, nest, restore_plan, saved_arrays
from tpo_jax.checkpoints.stacking import possible_layouts
from tpo_jax.config import ConfigError
from tpo_jax.tokenizer import NUM_ADDED_TOKENS
from tpo_jax.train.stages import param_group

INIT_REPORT_FILE = "init_from.json"  # written into the work directory at the start of a run
# parameters whose vocabulary axis may be NUM_ADDED_TOKENS shorter in a source: path -> that axis
VOCAB_AXES = {"llm.embed_tokens.embedding": 0, "llm.lm_head.kernel": 1}


@dataclasses.dataclass(frozen=True)
class Source:
    """One checked `init_from` entry: where its arrays are and how their paths relate to the model's."""

    path: str  # as given
    kind: str  # "videochat" | "hf" | "workdir"
    params_dir: Path  # the Orbax PyTree directory holding its arrays
    layouts: Any  # for `load_params` (None: the conversion.json next to params_dir)
    detail: str = ""  # e.g. "stage2 step 400" for a work directory


@dataclasses.dataclass
class InitPlan:
    """Which source gives which parameter, and the report of it."""

    sources: list[Source]
    direct: dict[int, list[str]]  # source index -> parameter paths restored from it (as stored or across layouts)
    extend: dict[str, tuple[int, str]]  # parameter path -> (source index, its array) for vocabulary extension
    report: dict[str, Any]

    @property
    def empty(self) -> bool:
        return not self.sources


def _fail(source: str, message: str) -> ConfigError:
    return ConfigError(f"config field 'init_from': {source}: {message}")


# ------------------------------------------------------------------------------------------------ sources

def resolve_sources(paths: Sequence[str], *, _seen: tuple[str, ...] = ()) -> list[Source]:
    """The checked sources of `paths` in merge order (a work directory expands to its own sources, then itself)."""
    out: list[Source] = []
    for path in paths:
        if not isinstance(path, str) or not path:
            raise ConfigError(f"config field 'init_from': entries are directory paths, got {path!r}")
        root = Path(path)
        if not root.exists():
            raise _fail(path, "no such file or directory")
        if not root.is_dir():
            raise _fail(path, "is a file; init_from takes directories (a tpo-convert output or a tpo-train work "
                              "directory)")
        if (root / REPORT_FILE).is_file():
            out.append(_converted(path, root))
        elif (root / "config.json").is_file():
            key = os.path.realpath(path)
            if key in _seen:
                raise _fail(path, "work directories name each other in init_from (a cycle)")
            out += _workdir(path, root, (*_seen, key))
        else:
            raise _fail(path, f"neither a converted checkpoint ({REPORT_FILE}, from tpo-convert) nor a tpo-train "
                              "work directory (config.json)")
    return out


def _converted(path: str, root: Path) -> Source:
    try:
        report = read_report(root)
        model_config(report)
    except (ConversionError, KeyError, TypeError) as e:
        raise _fail(path, f"unreadable {REPORT_FILE}: {e}") from None
    kind = report.get("format")
    if kind not in ("videochat", "hf", "llava_ov"):
        raise _fail(path, f"{REPORT_FILE} names format {kind!r}; expected 'videochat', 'hf' or 'llava_ov'")
    if not (root / "params").is_dir():
        raise _fail(path, "has no params/ directory (an incomplete tpo-convert output?)")
    return Source(path, kind, root / "params", None)


def _workdir(path: str, root: Path, seen: tuple[str, ...]) -> list[Source]:
    from tpo_jax.train.run_config import load_run_config  # noqa: PLC0415
    from tpo_jax.train.workdir import find_checkpoint, open_manager  # noqa: PLC0415

    try:
        run = load_run_config(str(root / "config.json"))
        stage, step = find_checkpoint(str(root), run)
    except ConfigError as e:
        raise _fail(path, f"a work directory without a usable checkpoint: {e}") from None
    with open_manager(str(root), stage, run, read_only=True) as mngr:
        params_dir = Path(mngr.directory) / str(step) / "params"
    if not params_dir.is_dir():
        raise _fail(path, f"the {stage} checkpoint of step {step} has no params/ ({params_dir})")
    inner = resolve_sources(run.init_from, _seen=seen) if run.init_from else []
    return inner + [Source(path, "workdir", params_dir, possible_layouts(run.model), f"{stage} step {step}")]


# ------------------------------------------------------------------------------------------------ plan

def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _vocab_extension(path: str, want: tuple[int, ...], saved: Mapping[str, tuple], source: Source) -> bool:
    """Whether `path` is a vocabulary table that `source` holds short by exactly the task tokens; a table of
    another vocabulary size is an error that says so."""
    axis = VOCAB_AXES.get(path)
    if axis is None or path not in saved:
        return False
    have = tuple(saved[path][0])
    if have == tuple(want):
        return False
    rest_same = len(have) == len(want) and all(h == w for i, (h, w) in enumerate(zip(have, want)) if i != axis)
    if rest_same and want[axis] - have[axis] == NUM_ADDED_TOKENS:
        return True
    what = (f"a vocabulary of {have[axis]} tokens, the model has {want[axis]} (only a vocabulary short by the "
            f"{NUM_ADDED_TOKENS} task tokens is extended)") if rest_same else "another architecture?"
    raise _fail(source.path, f"tensor '{path}': shape {have} in the checkpoint, {tuple(want)} in the model: {what}")


def plan_init(sources: Sequence[Source], shapes: Mapping[str, tuple[tuple[int, ...], Any]]) -> InitPlan:
    """Assign each model parameter ({path: (shape, dtype)}) to the last source that has it; check every shape
    against every source (metadata only). Each source must cover at least one parameter."""
    owner: dict[str, tuple[int, str]] = {}  # path -> (source index, "direct" | array name to extend)
    per_source = []
    for i, source in enumerate(sources):
        want = {p: s for p, (s, _) in shapes.items()}
        try:
            saved = saved_arrays(source.params_dir)
            extend = {p for p, s in want.items() if _vocab_extension(p, s, saved, source)}
            plan = restore_plan(source.params_dir, {p: s for p, s in want.items() if p not in extend}, source.layouts,
                                saved)
        except ConversionError as e:
            raise _fail(source.path, str(e)) from None
        covered = [p for p in want if p not in extend and p not in plan["missing"]]
        if not covered and not extend:
            raise _fail(source.path, f"covers none of the model's {len(want)} parameters (its arrays: e.g. "
                                     f"{sorted(plan['saved'])[:3]}): a checkpoint of another model?")
        for p in covered:
            owner[p] = (i, "direct")
        for p in extend:
            owner[p] = (i, p)
        per_source.append({"covered": covered, "extend": sorted(extend), "unused": plan["extra"]})
    direct: dict[int, list[str]] = {}
    extend_plan: dict[str, tuple[int, str]] = {}
    for p, (i, how) in owner.items():
        if how == "direct":
            direct.setdefault(i, []).append(p)
        else:
            extend_plan[p] = (i, how)
    report = _report(sources, shapes, owner, per_source)
    return InitPlan(list(sources), direct, extend_plan, report)


def _groups(paths, shapes) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for p in paths:
        g = out.setdefault(param_group(tuple(p.split("."))), {"tensors": 0, "bytes": 0})
        g["tensors"] += 1
        g["bytes"] += _nbytes(*shapes[p])
    return dict(sorted(out.items()))


def _report(sources, shapes, owner, per_source) -> dict[str, Any]:
    loaded_from = {i: [p for p, (j, _) in owner.items() if j == i] for i in range(len(sources))}
    initialised = [p for p in shapes if p not in owner]
    entries = []
    for i, source in enumerate(sources):
        entry = {"path": source.path, "kind": source.kind, "arrays": str(source.params_dir),
                 "loaded": _groups(loaded_from[i], shapes),
                 "overridden_by_later_sources": len(per_source[i]["covered"]) + len(per_source[i]["extend"])
                 - len(loaded_from[i]),
                 "unused_arrays": len(per_source[i]["unused"])}
        if source.detail:
            entry["checkpoint"] = source.detail
        extended = [p for p in per_source[i]["extend"] if owner.get(p, (None,))[0] == i]
        if extended:
            entry["vocabulary_extended"] = {p: f"{NUM_ADDED_TOKENS} task-token rows set to the mean of the others"
                                            for p in extended}
        entries.append(entry)
    return {"sources": entries, "initialised": _groups(initialised, shapes),
            "loaded_tensors": len(owner), "initialised_tensors": len(initialised)}


def format_report(report: Mapping[str, Any]) -> str:
    """The report as the lines `tpo-train` prints at the start."""
    def groups(g):
        return ", ".join(f"{k} {v['tensors']} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in g.items()) or "nothing"

    lines = [f"init_from: {report['loaded_tensors']} tensors loaded, {report['initialised_tensors']} initialised "
             f"from the seed"]
    for s in report["sources"]:
        where = f" ({s['checkpoint']})" if "checkpoint" in s else ""
        lines.append(f"  {s['kind']} {s['path']}{where}: {groups(s['loaded'])}")
        for p, what in s.get("vocabulary_extended", {}).items():
            lines.append(f"    {p}: {what}")
        if s["overridden_by_later_sources"]:
            lines.append(f"    {s['overridden_by_later_sources']} tensors overridden by later sources")
    lines.append(f"  initialised: {groups(report['initialised'])}")
    return "\n".join(lines)


def write_report(workdir: str, report: Mapping[str, Any]) -> None:
    from tpo_jax.train.workdir import write_json  # noqa: PLC0415
    write_json(os.path.join(workdir, INIT_REPORT_FILE), report)


# ------------------------------------------------------------------------------------------------ loading

def _extended(source: Source, name: str, path: str, value, block_bytes: int = 4 * 2**20) -> jax.Array:
    """A vocabulary table of the source with the task-token rows appended at the mean of its rows, placed with
    the sharding and dtype of `value`. The mean is accumulated over blocks of rows (about `block_bytes` each);
    each device's shard is then read from the source (its rows below the old vocabulary) and filled with the mean
    (above)."""
    axis = VOCAB_AXES[path]
    reader = ArrayReader(source.params_dir)
    old = saved_arrays(source.params_dir)[name][0]
    chunk_rows = max(1, block_bytes // (4 * int(np.prod(old)) // old[axis]))
    total = np.zeros([n for i, n in enumerate(old) if i != axis], np.float64)
    for start in range(0, old[axis], chunk_rows):
        block = [slice(None)] * len(old)
        block[axis] = slice(start, min(start + chunk_rows, old[axis]))
        total += reader.read(name, tuple(block)).astype(np.float32).sum(axis=axis, dtype=np.float64)
    mean = np.expand_dims((total / old[axis]).astype(np.float32), axis)
    dtype = np.dtype(value.dtype)

    def shard(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(old) - len(index))
        rows = range(value.shape[axis])[index[axis]]
        parts = []
        if rows.start < old[axis]:  # rows the source has
            part = list(index)
            part[axis] = slice(rows.start, min(rows.stop, old[axis]))
            parts.append(reader.read(name, tuple(part)).astype(dtype, copy=False))
        if rows.stop > old[axis]:  # the task-token rows
            other = list(index)
            other[axis] = slice(None)
            fill = mean[tuple(other)].astype(dtype)
            parts.append(np.repeat(fill, rows.stop - max(rows.start, old[axis]), axis=axis))
        return np.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0]

    return jax.make_array_from_callback(tuple(value.shape), value.sharding, shard)


def load_init(plan: InitPlan, *trees):
    """`trees` (nnx.States or nested dicts of placed arrays, e.g. a stage's trainable params and frozen params)
    with every parameter the plan covers replaced by its source's value, in the replaced array's dtype and
    sharding. Returns the trees in the same order."""
    flats = [_flat_state(t) for t in trees]
    where = {p: k for k, (flat, _) in enumerate(flats) for p in flat}
    new: list[dict[str, Any]] = [dict() for _ in trees]
    for i, paths in plan.direct.items():
        source = plan.sources[i]
        abstract = {p: _value(flats[where[p]][0][p]) for p in paths if p in where}
        if not abstract:
            continue
        spec = {p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for p, v in abstract.items()}
        try:
            got = load_params(source.params_dir, nest(spec), strict=False, layouts=source.layouts, sequential=True)
        except ConversionError as e:
            raise _fail(source.path, str(e)) from None
        except Exception as e:  # noqa: BLE001  (TensorStore / Orbax read errors: a truncated or damaged file)
            raise _fail(source.path, f"cannot read its arrays in {source.params_dir} ({_short(e)}); a truncated or "
                                     "damaged checkpoint?") from None
        for p, v in _flat_state(got)[0].items():
            new[where[p]][p] = v
    for p, (i, name) in plan.extend.items():
        if p in where:
            source = plan.sources[i]
            try:
                new[where[p]][p] = _extended(source, name, p, _value(flats[where[p]][0][p]))
            except Exception as e:  # noqa: BLE001
                raise _fail(source.path, f"cannot read '{name}' ({_short(e)}); a truncated or damaged "
                                         "checkpoint?") from None
    out = []
    for k, (flat, rebuild) in enumerate(flats):
        out.append(rebuild({p: new[k].get(p, _value(v)) for p, v in flat.items()}))
    return tuple(out)


def _short(e: Exception) -> str:
    """The first line of a read error, without TensorStore's spec dump."""
    text = str(e).split("See full TensorStore details")[0].splitlines()[0].strip().rstrip(".")
    return f"{type(e).__name__}: {text[:300]}"


def _value(leaf):
    return leaf.get_value() if hasattr(leaf, "get_value") else leaf


def model_shapes(*trees) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{path: (shape, dtype)} of the leaves of `trees` (nnx.States or nested dicts)."""
    out = {}
    for t in trees:
        for p, v in _flat_state(t)[0].items():
            v = _value(v)
            out[p] = (tuple(v.shape), v.dtype)
    return out


def prepare(init_from: Sequence[str], *trees) -> InitPlan:
    """`resolve_sources` + `plan_init` for the parameters of `trees`."""
    return plan_init(resolve_sources(list(init_from)), model_shapes(*trees))

