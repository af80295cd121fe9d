"""SAM2 memory path (MODEL-SPEC §7, §9.2): upstream SAM2 state-dict names (the release's `sam.*` keys without
`sam.`) -> `tpo_jax.sam2` memory modules. 158 keys in the release (106 memory attention, 40 memory encoder,
12 SAM2Base parameters). `src` / `dst` prefix both sides (e.g. src="sam.", dst="sam2.").

    memory_encoder.mask_downsampler.encoder.{3i}      -> memory_encoder.mask_downsampler.convs.{i}   (Conv2d)
    memory_encoder.mask_downsampler.encoder.{3i+1}    -> memory_encoder.mask_downsampler.norms.{i}   (LayerNorm2d)
    memory_encoder.mask_downsampler.encoder.{3n}      -> memory_encoder.mask_downsampler.final       (1×1 conv)
    memory_encoder.{pix_feat_proj,out_proj}           -> memory_encoder.{pix_feat_proj,out_proj}     (1×1 conv)
    memory_encoder.fuser.layers.{i}.dwconv            -> memory_encoder.fuser.{i}.dwconv  (256,1,7,7) -> (7,7,1,256)
    memory_encoder.fuser.layers.{i}.{norm,pwconv1,pwconv2,gamma} -> memory_encoder.fuser.{i}.<same>
    memory_attention.layers.{i}.{self_attn,cross_attn_image}.{q,k,v,out}_proj -> <same> (Linear, transposed)
    memory_attention.layers.{i}.{linear1,linear2,norm1,norm2,norm3}, memory_attention.norm -> <same>
    obj_ptr_proj.layers.{i}                           -> memory_tokens.obj_ptr_proj.layers.{i}
    no_obj_ptr (1, C)                                 -> memory_tokens.no_obj_ptr (C,)
    maskmem_tpos_enc (7, 1, 1, M)                     -> memory_tokens.maskmem_tpos_enc (7, M)
    no_mem_embed, no_mem_pos_enc (1, 1, C)            -> memory_tokens.<same> (C,)
    mask_downsample (1, 1, 4, 4)                      -> memory_tokens.mask_downsample (4, 4, 1, 1)

Conv2d weight (O, I/groups, kh, kw) -> kernel (kh, kw, I/groups, O). Every op only moves bytes, so export is
bit-exact. Not wired into `tpo-convert videochat` yet (those keys are still kept as `sam2/*` extras there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tpo_jax.checkpoints.mapping import Rule, linear, norm, rule
from tpo_jax.checkpoints.ops import Op, Permute, Squeeze

CONV2D = Permute((2, 3, 1, 0))

# The keys of the release this table handles (after stripping `sam.`).
MEMORY_PREFIXES = ("memory_encoder.", "memory_attention.", "obj_ptr_proj.", "mask_downsample.")
MEMORY_KEYS = ("maskmem_tpos_enc", "no_mem_embed", "no_mem_pos_enc", "no_obj_ptr")


def is_memory_key(name: str) -> bool:
    """True for an upstream SAM2 key (no `sam.` prefix) of the memory path."""
    return name in MEMORY_KEYS or name.startswith(MEMORY_PREFIXES)


@dataclass(frozen=True)
class DropUnitAxes(Op):
    """Remove the unit axes `axes` (maskmem_tpos_enc (7, 1, 1, M) -> (7, M) with axes (1, 2)); inverse re-inserts."""

    axes: tuple[int, ...] = ()
    name = "drop_unit_axes"

    def shapes(self, src):
        s = tuple(src[0])
        if any(a >= len(s) or s[a] != 1 for a in self.axes):
            raise ValueError(f"expected unit axes {self.axes}, got shape {s}")
        return [tuple(d for i, d in enumerate(s) if i not in self.axes)]

    def inverse_shapes(self, dst):
        s = list(dst[0])
        for a in sorted(self.axes):
            s.insert(a, 1)
        return [tuple(s)]

    def forward(self, xs):
        return [np.squeeze(xs[0], axis=self.axes)]

    def inverse(self, ys):
        return [np.expand_dims(ys[0], axis=self.axes)]


def conv(src: str, dst: str) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}.kernel", CONV2D), rule(f"{src}.bias", f"{dst}.bias")]


def memory_encoder(mask_layers: int = 4, *, src: str = "", dst: str = "") -> list[Rule]:
    s, d = f"{src}memory_encoder.", f"{dst}memory_encoder."
    rules: list[Rule] = []
    for i in range(mask_layers):
        rules += conv(f"{s}mask_downsampler.encoder.{3 * i}", f"{d}mask_downsampler.convs.{i}")
        rules += norm(f"{s}mask_downsampler.encoder.{3 * i + 1}", f"{d}mask_downsampler.norms.{i}")
    rules += conv(f"{s}mask_downsampler.encoder.{3 * mask_layers}", f"{d}mask_downsampler.final")
    rules += conv(f"{s}pix_feat_proj", f"{d}pix_feat_proj") + conv(f"{s}out_proj", f"{d}out_proj")
    f, g = f"{s}fuser.layers.{{i}}", f"{d}fuser.{{i}}"
    rules += conv(f"{f}.dwconv", f"{g}.dwconv") + norm(f"{f}.norm", f"{g}.norm")
    rules += linear(f"{f}.pwconv1", f"{g}.pwconv1") + linear(f"{f}.pwconv2", f"{g}.pwconv2")
    rules.append(rule(f"{f}.gamma", f"{g}.gamma"))
    return rules


def memory_attention(*, src: str = "", dst: str = "") -> list[Rule]:
    s, d = f"{src}memory_attention.layers.{{i}}.", f"{dst}memory_attention.layers.{{i}}."
    rules: list[Rule] = []
    for attn in ("self_attn", "cross_attn_image"):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rules += linear(f"{s}{attn}.{proj}", f"{d}{attn}.{proj}")
    rules += linear(f"{s}linear1", f"{d}linear1") + linear(f"{s}linear2", f"{d}linear2")
    for n in ("norm1", "norm2", "norm3"):
        rules += norm(f"{s}{n}", f"{d}{n}")
    return rules + norm(f"{src}memory_attention.norm", f"{dst}memory_attention.norm")


def memory_tokens(*, src: str = "", dst: str = "") -> list[Rule]:
    d = f"{dst}memory_tokens."
    rules = linear(f"{src}obj_ptr_proj.layers.{{i}}", f"{d}obj_ptr_proj.layers.{{i}}")
    rules += [rule(f"{src}no_obj_ptr", f"{d}no_obj_ptr", Squeeze(1)),
              rule(f"{src}maskmem_tpos_enc", f"{d}maskmem_tpos_enc", DropUnitAxes((1, 2))),
              rule(f"{src}no_mem_embed", f"{d}no_mem_embed", Squeeze(2)),
              rule(f"{src}no_mem_pos_enc", f"{d}no_mem_pos_enc", Squeeze(2))]
    return rules + conv(f"{src}mask_downsample", f"{d}mask_downsample")


def memory_path(mask_layers: int = 4, *, src: str = "", dst: str = "") -> list[Rule]:
    """All memory-path rules; our side is a module with attributes memory_encoder, memory_attention,
    memory_tokens (under `dst`)."""
    return (memory_encoder(mask_layers, src=src, dst=dst) + memory_attention(src=src, dst=dst)
            + memory_tokens(src=src, dst=dst))
