"""Generation settings, the error type and the prompt-length buckets."""

from __future__ import annotations

import dataclasses

from typing import Any

STRATEGIES = ("greedy", "sample", "beam")
SIDE_STEPS = ("released", "training")

#: head kinds; they index the slots. The k-th begin token of the model (`cfg.task_tokens.begin_tokens`:
#: `<box_begin>`, `<time_begin>`, `<track_begin>`) asks for head k, whose hidden state is read at the k-th
#: placeholder (`cfg.task_tokens.placeholders`: `<boxes>`, `<temp>`, `<tracking>`).
KINDS = ("region", "temporal", "mask")


class GenerationError(ValueError):
    """A request `generate` cannot serve (too long for the context, mixed media shapes, bad settings, ...)."""


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How `generate` decodes. Hashable: it is a static argument of the compiled decode loop.

    strategy: "greedy" (argmax), "sample" (temperature, then top-k, then top-p; needs an explicit `rng`) or
      "beam" (`num_beams` beams, finished beams keep their score; the best by score / length**length_penalty).
    stop_ids: a row stops after emitting one of these (the stop token is not part of the answer). None (the
      default): the tokenizer's (`for_tokenizer`: Mistral `</s>`; Qwen2 `<|im_end|>`, `<|endoftext|>`).
    pad_id: the id of left padding and of the tokens after a row's end; None (the default): the tokenizer's.
    side_step: "released" — on `<box_begin>` / `<time_begin>` / `<track_begin>` run one extra LLM step with the
      task-token vector at the begin token's position and the cache before it, keep its final-norm hidden
      state for the head and discard that step's cache (MODEL-SPEC §8.3, the released demo); generated tokens
      are fed as their plain embeddings, as the demo does. "training" — force the paired placeholder
      (`<box_begin><boxes>`, `<time_begin><temp>`, `<track_begin><tracking>`) as the next token, fed as the
      task-token vector (as in training), and read the head's hidden state there.
    max_boxes: region-head slots per answer (boxes in emission order; later ones are dropped). The temporal
      and mask heads read the last begin token of their kind (the demo's "last side step wins").
    buckets: prompt lengths are left-padded up to the smallest bucket that holds them (above the largest,
      to a multiple of it): one compile per (batch size, bucket, settings), none per token or prompt length.
    """

    max_new_tokens: int = 200
    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    num_beams: int = 4
    length_penalty: float = 1.0
    stop_ids: tuple[int, ...] | None = None
    side_step: str = "released"
    max_boxes: int = 4
    buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    pad_id: int | None = None

    def for_tokenizer(self, tok: Any) -> "GenerationConfig":
        """These settings with `stop_ids` / `pad_id` that are None taken from the model's tokenizer `tok`
        (`tpo_jax.model_tokenizer.model_tokenizer(cfg)`): its `stop_ids` (or `(eos_id,)`) and `pad_id`.
        `Generator` does this itself; call it to see (or record) the ids a decode will use."""
        stop = self.stop_ids
        if stop is None:
            stop = tuple(int(i) for i in getattr(tok, "stop_ids", (tok.eos_id,)))
        pad = int(tok.pad_id) if self.pad_id is None else self.pad_id
        return dataclasses.replace(self, stop_ids=tuple(stop), pad_id=pad)

    @property
    def resolved(self) -> bool:
        """Whether `stop_ids` and `pad_id` are set (the compiled decode needs both)."""
        return self.stop_ids is not None and self.pad_id is not None

    @property
    def rows_per_prompt(self) -> int:
        return self.num_beams if self.strategy == "beam" else 1

    def validate(self) -> "GenerationConfig":
        def check(ok, field, msg):
            if not ok:
                raise GenerationError(f"generation setting '{field}': {msg}")

        check(self.strategy in STRATEGIES, "strategy", f"{self.strategy!r} is not one of {list(STRATEGIES)}")
        check(self.side_step in SIDE_STEPS, "side_step", f"{self.side_step!r} is not one of {list(SIDE_STEPS)}")
        check(isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0, "max_new_tokens",
              f"must be a positive integer, got {self.max_new_tokens!r}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.num_beams >= 1, "num_beams", f"must be >= 1, got {self.num_beams}")
        check(self.max_boxes >= 1, "max_boxes", f"must be >= 1, got {self.max_boxes}")
        check(len(self.buckets) > 0 and all(b > 0 for b in self.buckets), "buckets", "must be positive lengths")
        return self


def bucket_length(length: int, buckets: tuple[int, ...]) -> int:
    """The padded prompt length for a prompt of `length` tokens."""
    for b in sorted(buckets):
        if length <= b:
            return b
    top = max(buckets)
    return -(-length // top) * top


def check_context(lengths, max_new_tokens: int, context: int) -> None:
    """One GenerationError when a prompt (plus the tokens to generate) does not fit the model's context."""
    longest = max(lengths)
    if longest >= context:
        raise GenerationError(f"prompt of {longest} tokens is longer than the model's context of {context} tokens "
                              f"(llm.max_position); shorten the prompt")
    if longest + max_new_tokens > context:
        raise GenerationError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                              f"context of {context} tokens (llm.max_position); lower max_new_tokens to at most "
                              f"{context - longest}")
