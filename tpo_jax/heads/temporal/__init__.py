"""CG-DETR temporal-grounding head (MODEL-SPEC §6, quirks §10.16–§10.17), one file per job:

- `model.py`       — `CGDETR`, the Flax NNX head (forward §6.3 steps 1–8), its parameter tree and the checkpoint
                     (`cg_model.*`) mapping; `insert_prompt`; the class indices `FOREGROUND` / `BACKGROUND`.
- `blocks.py`      — the building blocks `CGDETR` is made of: post-norm encoder layer, T2V (dummy-token) encoder
                     layer, DAB/Conditional-DETR decoder, input projections, PReLU, DropPath, sine embeddings.
- `loss.py`        — the released criterion: `temporal_loss_terms` (per-row sums of every term: Hungarian-matched
                     span L1 / GIoU / label, the saliency parts with and without negative pairs, ms_align,
                     distill, orthogonal_dummy), `term_count` (the batch count each term divides by),
                     `temporal_totals` (released weights × 0.05), `temporal_criterion` (one batch, whole).
- `batch.py`       — which rows form a criterion batch (groups of `criterion_group` rows), the negative query
                     pairs (`negative_pairs`), and the batch-wide counts (`temporal_counts`).
- `postprocess.py` — `postprocess_spans`: scored, sorted [start, end] windows in seconds (§6.4).

Import from the submodule, e.g. `from tpo_jax.heads.temporal.model import CGDETR`.
"""
