"""CG-DETR temporal-grounding head (MODEL-SPEC §6, quirks §10.16–§10.17), one file per job:

- `model.py`       — `CGDETR`, the Flax NNX head (forward §6.3 steps 1–8), its parameter tree and the checkpoint
                     (`cg_model.*`) mapping; `insert_prompt`; the class indices `FOREGROUND` / `BACKGROUND`.
- `blocks.py`      — the building blocks `CGDETR` is made of: post-norm encoder layer, T2V (dummy-token) encoder
                     layer, DAB/Conditional-DETR decoder, input projections, PReLU, DropPath, sine embeddings.
- `loss.py`        — `temporal_loss_terms`: Hungarian-matched span L1 / GIoU / label losses (`set_losses`, matching
                     with `tpo_jax.heads.hungarian`) and the saliency loss (`saliency_loss`, `rank_contrastive`,
                     `margin_loss`, `binary_cross_entropy`).
- `postprocess.py` — `postprocess_spans`: scored, sorted [start, end] windows in seconds (§6.4).

Import from the submodule, e.g. `from tpo_jax.heads.temporal.model import CGDETR`.
"""
