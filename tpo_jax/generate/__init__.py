"""Batched, compiled generation with the TPO task heads (MODEL-SPEC §8.3, §8.4).

    from tpo_jax.data.generation_prompt import encode_question, query_ids
    from tpo_jax.generate import GenerationConfig, GenerationRequest, generate
    from tpo_jax.model_tokenizer import model_tokenizer
    tok = model_tokenizer(model.cfg)  # Mistral (arch "videochat") or Qwen2 (arch "llava_ov")
    p = encode_question(model.cfg, tok, question, frame_times=times)  # the demo prompt, or LLaVA-OV's ChatML
    results = generate(model, [GenerationRequest(p.input_ids, p.visual_mask, frames, frame_size=(h, w),
                                                 duration=d, query_ids=query_ids(tok, question))],
                       GenerationConfig(max_new_tokens=200), tokenizer=tok)
    results[0].text, results[0].region[0]["box"], results[0].temporal["span"], results[0].track["prompt"]

* Prompts of one batch are left-padded to a length bucket (positions count from each prompt's first token,
  padded keys are masked), prefilled into a KV cache in one pass, then decoded by one jitted
  `lax.while_loop` of single-token steps: compiled once per (batch, bucket, settings), never per token or
  per prompt length inside a bucket.
* Strategies: greedy, sampling (temperature / top-k / top-p with an explicit `rng`), beam search; stop ids
  (default: the tokenizer's, `GenerationConfig.for_tokenizer`) and `max_new_tokens`.
* Task tokens (the model's ids, `cfg.task_tokens`): when a row emits `<box_begin>` / `<time_begin>` /
  `<track_begin>`, the released side step runs (task-token vector at the begin token's position, its cache
  discarded), or, with
  `side_step="training"`, the paired placeholder is forced next (`<box_begin><boxes>`). Each hidden state
  goes to its head (region box in pixels, temporal spans in seconds with scores and per-clip saliency,
  the mask head's SAM2 prompt and box); see `settings.GenerationConfig`.
* Temporal-head features: the model's own (pooled vision-encoder clips + question embeddings) or a precomputed file
  (`load_temporal_features`; format in `tpo_jax.generate.heads`).

Modules: `settings` (GenerationConfig, errors, buckets), `sampling` (token choice, beams), `decode` (the compiled prefill + loop), `heads` (task heads and their
inputs/outputs), `api` (requests → results),
`overlay` (drawing boxes, spans and saliency). A question in the model's prompt form: `tpo_jax.data.generation_prompt`.
"""

from tpo_jax.generate.api import GenerationRequest, GenerationResult, Generator, generate
from tpo_jax.generate.decode import DecodeOutput, compiled_decode
from tpo_jax.generate.heads import TemporalFeatures, load_temporal_features
from tpo_jax.generate.settings import GenerationConfig, GenerationError

__all__ = ["DecodeOutput", "GenerationConfig", "GenerationError", "GenerationRequest", "GenerationResult",
           "Generator", "TemporalFeatures", "compiled_decode", "generate", "load_temporal_features"]
