"""FPN neck of SAM2's image encoder (upstream `FpnNeck` + `ImageEncoder`), channels-last.

Input: the trunk's stage maps, highest resolution first. Level i gets a 1×1 lateral conv to d_model
(`convs.{n−i}`: the convs are listed lowest resolution first, as `backbone_channel_list`). Going from the
coarsest level down, a level in `fpn_top_down_levels` adds the previous (coarser) result upsampled 2× by nearest
neighbour (upsampled in float32; halved for fuse_type "avg"); other levels use their lateral alone. Each output
level gets the sine position encoding of its size (`tpo_jax.sam2.position`). The last `scalp` (coarsest) levels
are dropped from the outputs.

Params: convs.{k}.conv.{kernel (1, 1, C_k, d), bias (d,)}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpo_jax.sam2.config import NeckConfig
from tpo_jax.sam2.layers import Conv2d
from tpo_jax.sam2.position import sine_position_encoding


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """(B, H, W, C) → (B, 2H, 2W, C), each pixel repeated in a 2×2 block."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FpnNeck(nnx.Module):
    def __init__(self, cfg: NeckConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None):
        self.cfg, self.dtype = cfg, dtype
        self.convs = nnx.List([
            nnx.Dict(conv=Conv2d(c, cfg.d_model, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            for c in cfg.backbone_channel_list])

    def __call__(self, xs: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
        """Stage maps (highest resolution first) → (features, position encodings), each a list of (B, h, w, d)
        maps, highest resolution first, without the `scalp` coarsest levels; position encodings broadcast to
        the batch, in the features' dtype."""
        n = len(self.convs) - 1
        if len(xs) != n + 1:
            raise ValueError(f"FPN neck: expected {n + 1} feature maps, got {len(xs)}")
        out: list = [None] * (n + 1)
        pos: list = [None] * (n + 1)
        prev = None
        for i in range(n, -1, -1):
            lateral = self.convs[n - i]["conv"](xs[i])
            if i in self.cfg.fpn_top_down_levels and prev is not None:
                top_down = upsample_nearest_2x(prev.astype(jnp.float32))
                prev = lateral + top_down
                if self.cfg.fuse_type == "avg":
                    prev = prev / 2
                prev = prev.astype(self.dtype)
            else:
                prev = lateral
            out[i] = prev
            b, h, w, d = prev.shape
            pe = sine_position_encoding(h, w, d, temperature=self.cfg.pe_temperature, dtype=prev.dtype)
            pos[i] = jnp.broadcast_to(pe, (b, h, w, d))
        keep = len(out) - self.cfg.scalp
        return out[:keep], pos[:keep]
