"""The mapping engine: declarative rules (source key pattern -> our parameter path + transform) and the plans
built from them, in both directions.

A `Rule` names its source keys and destination paths as templates with placeholders `{i}`, `{j}` (digits) and
`{rest}` (anything), plus an op from `tpo_jax.checkpoints.ops`. Kinds:

* ``param``: destination paths are parameters of our model (dotted paths of the nnx.Param tree);
* ``extra``: the tensor is kept unchanged in the `extras` tree of the output (PyTorch name and layout), e.g.
  the SAM2 modules our model has no module for; destination is ``<group>/<name>``;
* ``drop``:  the tensor is dropped (buffers that are recomputed).

`build_plan` checks a whole source against the rules and the model's parameter shapes using only the headers
(shapes and dtypes), and raises one `ConversionError` naming the file and key on the first problem: a key no
rule knows (unexpected), a rule sibling or a model parameter with no source (missing), or a shape that does
not fit. `build_export_plan` does the same in the other direction (our tree -> PyTorch keys).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple, Sequence

from tpo_jax.checkpoints.errors import ConversionError
from tpo_jax.checkpoints.ops import COPY, NotInvertible, Op, Shape, T

_PLACEHOLDERS = {"i": r"\d+", "j": r"\d+", "rest": r".+"}


class Template:
    """A key template such as ``model.layers.{i}.mlp.up_proj.weight``."""

    def __init__(self, text: str):
        self.text = text
        names = re.findall(r"\{(\w+)\}", text)
        unknown = [n for n in names if n not in _PLACEHOLDERS]
        if unknown:
            raise ValueError(f"template {text!r}: unknown placeholder(s) {unknown}")
        pattern, pos, seen = "", 0, set()
        for m in re.finditer(r"\{(\w+)\}", text):
            pattern += re.escape(text[pos:m.start()])
            name = m.group(1)
            pattern += f"(?P={name})" if name in seen else f"(?P<{name}>{_PLACEHOLDERS[name]})"
            seen.add(name)
            pos = m.end()
        pattern += re.escape(text[pos:])
        self.regex = re.compile(pattern + r"\Z")
        self.literal = text.split("{", 1)[0]

    def match(self, key: str) -> dict[str, str] | None:
        if not key.startswith(self.literal):
            return None
        m = self.regex.match(key)
        return None if m is None else m.groupdict()

    def fill(self, bindings: Mapping[str, str]) -> str:
        return self.text.format(**bindings)


@dataclass(frozen=True)
class Rule:
    """Source key templates -> destination path templates, through `op`."""

    src: tuple[str, ...]
    dst: tuple[str, ...] = ()
    op: Op = COPY
    kind: str = "param"  # "param" | "extra" | "drop"
    note: str = ""

    def __post_init__(self):
        if self.kind not in ("param", "extra", "drop"):
            raise ValueError(f"rule {self.src}: unknown kind {self.kind!r}")
        object.__setattr__(self, "_src_t", tuple(Template(s) for s in self.src))
        object.__setattr__(self, "_dst_t", tuple(Template(d) for d in self.dst))


# ------------------------------------------------------------------------------------------------ table helpers

def rule(src: str | Sequence[str], dst: str | Sequence[str], op: Op = COPY, note: str = "") -> Rule:
    src = (src,) if isinstance(src, str) else tuple(src)
    dst = (dst,) if isinstance(dst, str) else tuple(dst)
    return Rule(src, dst, op, "param", note)


def linear(src: str, dst: str, *, bias: bool = True) -> list[Rule]:
    """PyTorch nn.Linear `src.{weight,bias}` -> our Linear `dst.{kernel,bias}` (weight transposed)."""
    out = [rule(f"{src}.weight", f"{dst}.kernel", T)]
    return out + [rule(f"{src}.bias", f"{dst}.bias")] if bias else out


def norm(src: str, dst: str, *, bias: bool = True) -> list[Rule]:
    """LayerNorm / RMSNorm `src.{weight,bias}` -> `dst.{scale,bias}`."""
    out = [rule(f"{src}.weight", f"{dst}.scale")]
    return out + [rule(f"{src}.bias", f"{dst}.bias")] if bias else out


def extra(src: str, dst: str, note: str) -> Rule:
    """Keep `src` unchanged in the extras tree at `dst` (``group/name``)."""
    return Rule((src,), (dst,), COPY, "extra", note)


def drop(src: str, note: str) -> Rule:
    return Rule((src,), (), COPY, "drop", note)


# ------------------------------------------------------------------------------------------------------ plans

class Meta(NamedTuple):
    """What the header of a source says about one tensor."""

    shape: Shape
    dtype: object  # numpy dtype
    file: str


@dataclass
class Job:
    """One application of a rule: these source keys -> these destination paths."""

    rule: Rule
    src: tuple[str, ...]
    dst: tuple[str, ...]
    src_shapes: tuple[Shape, ...]
    dst_shapes: tuple[Shape, ...]


@dataclass
class Plan:
    params: list[Job] = field(default_factory=list)
    extras: list[Job] = field(default_factory=list)
    dropped: list[Job] = field(default_factory=list)

    def summary(self) -> dict:
        def count(jobs):
            return sum(len(j.src) for j in jobs)
        groups: dict[str, int] = {}
        for j in self.params:
            for k in j.src:
                groups[_component(k)] = groups.get(_component(k), 0) + 1
        return {"mapped_keys": count(self.params), "extra_keys": count(self.extras),
                "dropped_keys": count(self.dropped), "params_written": sum(len(j.dst) for j in self.params),
                "mapped_by_component": dict(sorted(groups.items()))}


def _component(key: str) -> str:
    head = key.split(".", 1)[0]
    return "lm" if head in ("lm", "model", "lm_head", "base_model") else head


def match_key(rules: Sequence[Rule], key: str, side: str = "src"):
    """First (rule, bindings) whose `side` template matches `key`, or None."""
    for r in rules:
        for t in (r._src_t if side == "src" else r._dst_t):
            b = t.match(key)
            if b is not None:
                return r, b
    return None


def build_plan(source: Mapping[str, Meta], rules: Sequence[Rule], target: Mapping[str, Shape], *,
               where: str, keep_extras: bool = True) -> Plan:
    """Check every source key and every target parameter; return the jobs. Raises ConversionError."""
    plan = Plan()
    done: set[str] = set()
    produced: dict[str, str] = {}
    for key, meta in source.items():
        if key in done:
            continue
        found = match_key(rules, key)
        if found is None:
            raise ConversionError("unexpected key: no mapping rule knows it (is this the right source "
                                  "format, and are its key names unchanged?)", file=meta.file, key=key)
        r, b = found
        src = tuple(t.fill(b) for t in r._src_t)
        for s in src:
            if s not in source:
                raise ConversionError(f"missing key, needed together with '{key}' ({r.op.name} of "
                                      f"{list(src)})", file=where, key=s)
        done.update(src)
        shapes = tuple(tuple(source[s].shape) for s in src)
        if r.kind == "drop":
            plan.dropped.append(Job(r, src, (), shapes, ()))
            continue
        if r.kind == "extra":
            if keep_extras:
                plan.extras.append(Job(r, src, tuple(t.fill(b) for t in r._dst_t), shapes, shapes))
            else:
                plan.dropped.append(Job(r, src, (), shapes, ()))
            continue
        dst = tuple(t.fill(b) for t in r._dst_t)
        try:
            dst_shapes = tuple(tuple(s) for s in r.op.shapes(list(shapes)))
        except (ValueError, NotInvertible) as e:
            raise ConversionError(f"shape mismatch: {e}", file=meta.file, key=key) from None
        for d, ds in zip(dst, dst_shapes):
            if d not in target:
                raise ConversionError(f"maps to parameter '{d}', which the model does not have (does the "
                                      "config match the checkpoint, e.g. number of layers, LoRA targets?)",
                                      file=meta.file, key=key)
            if tuple(target[d]) != ds:
                raise ConversionError(f"shape mismatch: {list(shapes)} gives {ds} for parameter '{d}', but the "
                                      f"model expects {tuple(target[d])}", file=meta.file, key=key)
            if d in produced:
                raise ConversionError(f"parameter '{d}' is produced twice (also from '{produced[d]}')",
                                      file=meta.file, key=key)
            produced[d] = key
        plan.params.append(Job(r, src, dst, shapes, dst_shapes))
    missing = [p for p in target if p not in produced]
    if missing:
        p = missing[0]
        found = match_key(rules, p, side="dst")
        expected = None
        if found is not None:
            r, b = found
            expected = ", ".join(t.fill(b) for t in r._src_t)
        more = f" ({len(missing)} parameters missing in total, e.g. {missing[:5]})" if len(missing) > 1 else ""
        raise ConversionError(f"missing key: no source tensor for parameter '{p}'{more}", file=where,
                              key=expected)
    return plan


def build_export_plan(ours: Mapping[str, Shape], extras: Mapping[str, Shape], rules: Sequence[Rule], *,
                      where: str) -> Plan:
    """Our parameters (and extras) -> PyTorch keys. Raises ConversionError on a parameter no rule exports."""
    plan = Plan()
    done: set[str] = set()
    for tree, kinds in ((ours, ("param",)), (extras, ("extra",))):
        for path in tree:
            if path in done:
                continue
            found = _match_dst(rules, path, kinds)
            if found is None:
                raise ConversionError("no export rule for this parameter", file=where, key=path)
            r, b = found
            dst = tuple(t.fill(b) for t in r._dst_t)
            for d in dst:
                if d not in tree:
                    raise ConversionError(f"missing parameter, needed together with '{path}' ({r.op.name})",
                                          file=where, key=d)
            done.update(dst)
            dst_shapes = tuple(tuple(tree[d]) for d in dst)
            src = tuple(t.fill(b) for t in r._src_t)
            try:
                src_shapes = tuple(tuple(s) for s in r.op.inverse_shapes(list(dst_shapes)))
            except (ValueError, NotInvertible) as e:
                raise ConversionError(f"cannot export: {e}", file=where, key=path) from None
            (plan.params if r.kind == "param" else plan.extras).append(Job(r, src, dst, src_shapes, dst_shapes))
    return plan


def _match_dst(rules: Iterable[Rule], path: str, kinds: tuple[str, ...]):
    for r in rules:
        if r.kind not in kinds:
            continue
        for t in r._dst_t:
            b = t.match(path)
            if b is not None:
                return r, b
    return None
