"""`tpo-forward`: run the TPO model's forward pass on a synthetic clip and print what comes out.

    tpo-forward                       # tiny preset, random weights, a synthetic moving-square clip
    tpo-forward --question "Where is the square?" --new-tokens 8
    tpo-forward --preset llava_ov_tpo_tiny  # the LLaVA-OV architecture (ChatML prompt, Qwen2 tokenizer)

It builds the model's prompt with its tokenizer (`model_tokenizer`; VideoChat: the demo prompt of MODEL-SPEC §4.3,
LLaVA-OV: ChatML with the video's rows), appends a planted
`<box_begin><boxes>` so a task-token hidden state exists, runs one jitted forward pass (with the region
head's box at that token), then greedy-
decodes a few tokens with the KV cache. The clip is `tpo_jax.data.synthetic.synthetic_clip`: a coloured square
moving over a grey background. With random weights the words are noise; the point is to
show every stage running end to end with the shapes the real model uses.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpo_jax import config as C
from tpo_jax.cli.common import add_debug_flag, guarded
from tpo_jax.data.generation_prompt import encode_question
from tpo_jax.data.synthetic import synthetic_clip
from tpo_jax.llm import KVCache
from tpo_jax.model import TPOModel
from tpo_jax.model_tokenizer import model_tokenizer

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpo-forward", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help=f"model preset, one of {sorted(C.PRESETS)}")
    p.add_argument("--question", default="Where is the red square?")
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens to decode with the KV cache")
    p.add_argument("--seed", type=int, default=0)
    add_debug_flag(p)
    args = p.parse_args(argv)
    return guarded("tpo-forward", lambda: _run(args), args.debug)


def _run(args) -> int:
    cfg = C.get_config(args.preset)
    t0 = time.perf_counter()
    model = TPOModel(cfg, rngs=nnx.Rngs(args.seed))
    tok = model_tokenizer(cfg)
    prompt = encode_question(cfg, tok, args.question)
    planted = tok.encode("<box_begin><boxes>", add_bos=False)
    ids = np.concatenate([prompt.input_ids, planted])[None]
    visual_mask = np.concatenate([prompt.visual_mask, np.zeros(len(planted), bool)])[None]
    frames = synthetic_clip(np.random.default_rng(args.seed), cfg.num_frames, cfg.frame_size)[0][None]

    graphdef, state = nnx.split(model)
    max_len = ids.shape[1] + args.new_tokens

    @jax.jit
    def prefill(state, ids, visual_mask, frames):
        m = nnx.merge(graphdef, state)
        return m(ids, visual_mask=visual_mask, frames=frames, cache=KVCache.init(cfg.llm, ids.shape[0], max_len),
                 heads=("region",))

    @jax.jit
    def decode(state, token, cache):
        return nnx.merge(graphdef, state)(token, cache=cache)

    out = prefill(state, jnp.asarray(ids), jnp.asarray(visual_mask), jnp.asarray(frames))
    region = out.heads.region
    generated, cache = [], out.cache
    token = jnp.argmax(out.logits[:, -1], axis=-1)[:, None]
    for _ in range(args.new_tokens):
        generated.append(int(token[0, 0]))
        step = decode(state, token, cache)
        cache, token = step.cache, jnp.argmax(step.logits[:, -1], axis=-1)[:, None]

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(json.dumps({
        "preset": args.preset, "arch": cfg.arch, "parameters": n_params, "frames": list(frames.shape),
        "prompt_tokens": int(ids.shape[1]), "visual_tokens": int(visual_mask.sum()),
        "logits": list(out.logits.shape), "hidden": list(out.hidden.shape),
        "boxes_token_position": int(region.positions[0, 0]), "boxes_slot_present": bool(region.present[0, 0]),
        "region_box_xyxy": [round(float(v), 4) for v in region.boxes[0, 0]],
        "greedy_ids": generated, "greedy_text": tok.decode(generated),
        "seconds": round(time.perf_counter() - t0, 2),
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
