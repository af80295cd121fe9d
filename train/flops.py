"""FLOPs of the train step, counted from its jaxpr.

XLA's `compiled.cost_analysis()` counts the body of a `while` loop once, not once per trip: the
scanned 32-layer LLM reports the FLOPs of one layer. So the project counts FLOPs itself. It traces
the step to a jaxpr and adds up

* every matmul: `dot_general` = 2 · output elements · contracted size; `conv_general_dilated` =
  2 · output elements · kernel elements per output feature;
* elementwise arithmetic, comparisons, selects and converts (1 per output element) and reductions
  (1 per input element), transcendentals (`exp`, `log`, `tanh`, ...) apart — how XLA counts them;

multiplying the body of every `scan` by its length and recursing into every nested jaxpr (`jit`,
`remat`, `custom_vjp`, `cond` takes its costliest branch). A `while` loop whose trip count depends on
data (the Hungarian matcher) is counted once and reported in `unknown_loops`; an opaque kernel
(`pallas_call`, a cuDNN call) adds nothing and is reported in `opaque`.

Autodiff has already decided which products the backward pass needs, so the count is the usual
"6N for trainable, 4N for frozen-weight matmuls" rule made exact per tensor: a frozen weight gets no
weight gradient, and a stack with nothing trainable upstream of it (the frozen ViT of stage 2) gets no
backward pass at all.

`step_flops(..., model=True)` gives **model FLOPs**, the numerator of MFU: the step is traced with every
stack's remat policy `none` and attention `einsum`, so recomputation and the attention kernel do not
change the number. `model=False` gives executed FLOPs: the config's remat (recomputation included), attention
still counted as `einsum` (a Pallas or cuDNN kernel is opaque to the jaxpr but does the same products).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from jax.extend import core as jex_core

_ELEMENTWISE = frozenset({
    "add", "add_any", "sub", "mul", "div", "rem", "neg", "abs", "sign", "max", "min", "floor", "ceil", "round",
    "square", "integer_pow", "clamp", "select_n", "convert_element_type", "eq", "ne", "lt", "le", "gt", "ge",
    "and", "or", "not", "xor", "nextafter", "is_finite", "copysign",
})
_TRANSCENDENTAL = frozenset({
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "atan2", "asin", "acos",
    "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "pow", "erf", "erfc", "erf_inv",
    "lgamma", "digamma",
})
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
                         "argmax", "argmin", "cumsum", "cummax", "cumlogsumexp"})
_OPAQUE = frozenset({"pallas_call", "custom_call", "tpu_custom_call", "cudnn_dot_product_attention"})


@dataclasses.dataclass
class FlopCount:
    """FLOPs of a program (whole program, all devices together)."""

    matmul: float = 0.0  # dot_general + convolutions, 2 per multiply-add
    elementwise: float = 0.0  # arithmetic, comparisons, selects, converts, reductions
    transcendental: float = 0.0  # exp, log, tanh, ... (XLA counts these apart from its "flops")
    unknown_loops: int = 0  # while loops with a data-dependent trip count, counted once
    opaque: dict[str, int] = dataclasses.field(default_factory=dict)  # kernels whose FLOPs are not visible

    @property
    def total(self) -> float:
        """matmul + elementwise: what XLA's cost analysis calls "flops"."""
        return self.matmul + self.elementwise

    def add(self, other: "FlopCount", times: float = 1.0) -> None:
        self.matmul += times * other.matmul
        self.elementwise += times * other.elementwise
        self.transcendental += times * other.transcendental
        self.unknown_loops += other.unknown_loops
        for name, n in other.opaque.items():
            self.opaque[name] = self.opaque.get(name, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), total=self.total)


def _size(aval) -> int:
    return math.prod(getattr(aval, "shape", ()))


def _dot_flops(eqn) -> float:
    lhs = eqn.invars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    contracted = math.prod(lhs.shape[d] for d in lhs_contract)
    return 2.0 * _size(eqn.outvars[0].aval) * contracted


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    per_output = _size(rhs) // rhs.shape[out_feature_dim]
    return 2.0 * _size(eqn.outvars[0].aval) * per_output


def _sub_jaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def count_jaxpr(jaxpr) -> FlopCount:
    """FLOPs of one run of `jaxpr` (a Jaxpr or ClosedJaxpr), scan bodies times their length."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    out = FlopCount()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            out.matmul += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            out.matmul += _conv_flops(eqn)
        elif name in _ELEMENTWISE:
            out.elementwise += sum(_size(v.aval) for v in eqn.outvars)
        elif name in _TRANSCENDENTAL:
            out.transcendental += sum(_size(v.aval) for v in eqn.outvars)
        elif name in _REDUCTIONS:
            out.elementwise += _size(eqn.invars[0].aval)
        elif name == "scan":
            out.add(count_jaxpr(eqn.params["jaxpr"]), times=eqn.params["length"])
        elif name == "while":
            out.add(count_jaxpr(eqn.params["cond_jaxpr"]))
            out.add(count_jaxpr(eqn.params["body_jaxpr"]))
            out.unknown_loops += 1
        elif name == "cond":
            branches = [count_jaxpr(b) for b in eqn.params["branches"]]
            out.add(max(branches, key=lambda c: c.total))
        elif name in _OPAQUE:
            out.opaque[name] = out.opaque.get(name, 0) + 1
        else:
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    out.add(count_jaxpr(sub))
    return out


def count_fn(fn, *args, **kwargs) -> FlopCount:
    """FLOPs of `fn(*args, **kwargs)`; the args may be ShapeDtypeStructs (nothing is computed)."""
    return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs))


def model_flops_config(model_cfg, remat: bool = False):
    """`model_cfg` with attention `einsum` in every stack (a fused kernel's FLOPs are invisible in the jaxpr) and,
    unless `remat`, remat `none`: the program whose FLOPs are model FLOPs (`remat=True`: executed FLOPs)."""
    from tpo_jax.config import replace
    changes = {}
    for stack in model_cfg.stacks:
        if not remat:
            changes[f"{stack}.stack.remat_policy"] = "none"
            changes[f"{stack}.stack.remat_save"] = ()
        changes[f"{stack}.stack.attention"] = "einsum"
    return replace(model_cfg, **changes)


def step_flops(model_cfg, train_cfg, batch: dict, *, model: bool = True) -> FlopCount:
    """FLOPs of one train step of `train_cfg.stage` on `batch` (arrays or ShapeDtypeStructs of the global batch).

    `model=True`: model FLOPs (remat `none`); False: executed FLOPs (the config's remat, recomputation included).
    Attention is counted as `einsum` either way: a fused kernel does the same products, out of the jaxpr's sight.
    """
    from tpo_jax.model import abstract_model
    from tpo_jax.train.optim import make_optimizer
    from tpo_jax.train.stages import get_recipe
    from tpo_jax.train.step import _new_state, cast_frozen, make_train_step, split_model

    cfg = model_flops_config(model_cfg, remat=not model)
    recipe = get_recipe(train_cfg.stage)
    graphdef, abs_params, abs_frozen = split_model(abstract_model(cfg), recipe)
    abs_frozen = jax.eval_shape(lambda f: cast_frozen(f, cfg), abs_frozen)
    tx = make_optimizer(recipe, abs_params, train_cfg.optim)
    abs_state = jax.eval_shape(lambda p: _new_state(tx, p), abs_params)
    step = make_train_step(graphdef, tx, cfg, train_cfg, jit=False)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype)
    return count_fn(step, abs_state, abs_frozen, batch, rng)


def step_flops_from(jaxpr, model_cfg, train_cfg, batch: dict, *, model: bool = True) -> FlopCount:
    """`step_flops` of a step whose own jaxpr is at hand (`jaxpr`: a ClosedJaxpr, or a callable returning it): that
    jaxpr is counted when the step's config is already the one to count, else the step is traced anew."""
    if model_flops_config(model_cfg, remat=not model) == model_cfg:
        return count_jaxpr(jaxpr() if callable(jaxpr) else jaxpr)
    return step_flops(model_cfg, train_cfg, batch, model=model)
