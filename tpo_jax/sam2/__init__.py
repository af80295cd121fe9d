"""SAM2 in Flax NNX: image path (Hiera, FPN neck, prompt encoder, mask decoder) and memory path (memory encoder,
memory attention, object pointers).

Target: upstream SAM 2 v1 Hiera-L as released inside VideoChat-TPO (MODEL-SPEC §7). Image path modules: `config`
(dataclasses and presets), `position` (sine position encoding, shared with the memory encoder), `hiera` (image
encoder trunk), `neck` (FPN neck), `mask_decoder` (two-way transformer and heads), `image` (assembled image
predictor). Conversion table: `tpo_jax.checkpoints.tables.sam2`; docs/sam2.md.
"""
