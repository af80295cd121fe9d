"""Region head: `loc_decoder` MLP from a `<boxes>` hidden state to a box, and its loss (MODEL-SPEC §5.1, §5.3.1).

Checkpoint mapping (PyTorch `nn.Sequential` → this module; Linear weight (out, in) → kernel (in, out)):

    loc_decoder.0.weight  (2048, 4096) → loc_decoder.layers.0.kernel  (4096, 2048)   (transposed)
    loc_decoder.0.bias    (2048,)      → loc_decoder.layers.0.bias    (2048,)
    loc_decoder.2.weight  (4, 2048)    → loc_decoder.layers.1.kernel  (2048, 4)      (transposed)
    loc_decoder.2.bias    (4,)         → loc_decoder.layers.1.bias    (4,)

(index `.2` in the checkpoint because `.1` is the parameter-free ReLU of the Sequential).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax.config import RegionHeadConfig
from tpo_jax.heads.box_ops import box_giou
from tpo_jax.layers import MLP

# 1 − GIoU ∈ [0, 2]; the released code uses 2 when no prediction is a valid box.
MAX_GIOU_PENALTY = 2.0
# Stand-in for an invalid prediction inside the GIoU evaluation (its value is discarded).
_SAFE_BOX = (0.0, 0.0, 1.0, 1.0)


class RegionHead(nnx.Module):
    """`loc_decoder`: Linear(D → hidden), ReLU, Linear(hidden → 4).

    The output is the raw normalised (x0, y0, x1, y1) box — no sigmoid and no clamp, as released
    (MODEL-SPEC §10.2 item 20); the demo multiplies it by the frame width/height.
    """

    def __init__(self, llm_hidden: int, cfg: RegionHeadConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.loc_decoder = MLP((llm_hidden, cfg.hidden, 4), axes=[("embed", "mlp"), ("mlp", None)], dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        """h (..., D) final-norm hidden states at `<boxes>` rows → boxes (..., 4) in the compute dtype."""
        return self.loc_decoder(h)


def valid_box(b: jax.Array) -> jax.Array:
    """(..., 4) → (...) bool: x1 ≥ x0 and y1 ≥ y0 (the released validity test on predictions)."""
    return (b[..., 2] >= b[..., 0]) & (b[..., 3] >= b[..., 1])


def region_loss_terms(pred: jax.Array, target: jax.Array, cfg: RegionHeadConfig) -> dict[str, jax.Array]:
    """Per-slot region-loss terms, all float32 of shape (B, K) for pred/target (B, K, 4) normalised xyxy.

    * ``l1``   = mean over the 4 coordinates of |p − g|.
    * ``giou`` = 1 − GIoU(p, g), or the constant 2.0 (zero gradient, no NaN) when the *prediction* is not a
      valid box (x1 < x0 or y1 < y0). The invalid box is swapped for a fixed dummy box before GIoU is
      evaluated and the result is discarded by a `where`, so no gradient (and no NaN) reaches it.
    * ``mse``  = mean over the 4 coordinates of (p − g)².
    * ``loss_region`` = cfg.l1_weight·l1 + cfg.giou_weight·giou for cfg.loss == "l1_giou" (2·L1 + GIoU/5 as
      released), or mse for cfg.loss == "mse".

    The caller masks invalid / unused slots and normalises by the number of valid slots, i.e.
    L = Σ_{b,k} valid·loss_region / max(Σ valid, 1). That makes the L1 part identical to the released
    "mean over all n·4 elements". The released GIoU part instead averages 1 − GIoU over the rows whose
    prediction is valid only (and uses 2 when there is none); that is not a per-slot quantity (its
    normaliser depends on the predictions) and would not accumulate exactly over micro-batches. The
    per-slot version here (invalid prediction → 2) is identical to it whenever every prediction is
    valid, which is the normal state after the first steps of training.
    """
    p = pred.astype(jnp.float32)
    g = target.astype(jnp.float32)
    diff = p - g
    l1 = jnp.mean(jnp.abs(diff), axis=-1)
    mse = jnp.mean(jnp.square(diff), axis=-1)

    ok = valid_box(p)
    p_safe = jnp.where(ok[..., None], p, jnp.asarray(_SAFE_BOX, jnp.float32))
    giou = jnp.where(ok, 1.0 - box_giou(p_safe, g), MAX_GIOU_PENALTY)

    if cfg.loss == "l1_giou":
        total = cfg.l1_weight * l1 + cfg.giou_weight * giou
    elif cfg.loss == "mse":
        total = mse
    else:
        raise ValueError(f"RegionHeadConfig.loss {cfg.loss!r} is not one of ['l1_giou', 'mse']")
    return {"l1": l1, "giou": giou, "mse": mse, "loss_region": total}
