"""LLaVA-OneVision (the TPO variant of issue 25) in Flax NNX: the vision side so far.

Modules: `siglip` (SigLIP vision tower, `SiglipConfig` and presets), `projector` (2-layer GELU projector),
`visual_tokens` (anyres_max_9 tiling and packing plans, video pooling; host-side sizes in NumPy), `vision`
(tower + projector + image_newline assembled). Conversion table: `tpo_jax.checkpoints.tables.llava_ov_vision`;
docs/llava_ov.md.
"""
