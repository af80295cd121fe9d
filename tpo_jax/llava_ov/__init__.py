"""LLaVA-OneVision (the TPO variant of issue 25) in Flax NNX: the base model (vision side + Qwen2 decoder).

Modules: `siglip` (SigLIP vision tower and the presets of its `tpo_jax.config.SiglipConfig`), `projector` (2-layer GELU projector),
`visual_tokens` (anyres_max_9 tiling and packing plans, video pooling; host-side sizes in NumPy), `vision`
(tower + projector + image_newline assembled), `model` (`LlavaOVConfig`, `LlavaOV`: visual features written into
the `<image>` / `<video>` rows, then the Qwen2 decoder), `tokenizer` (`LlavaOVTokenizer`: Qwen2 tokenizer + TPO task
tokens, the LLaVA-OV chat template, placeholder expansion). Conversion tables:
`tpo_jax.checkpoints.tables.llava_ov` (whole checkpoint) and `llava_ov_vision` (vision side); docs/llava_ov.md.
"""
