"""ViT and Q-Former weights in VideoChat-TPO key names -> tpo-convert -> our forwards equal PyTorch's (f32).

References: the PyTorch UMT composition of tests/test_parity_vit.py (Conv3d + VideoMAE layers + LayerNorm) and
transformers' InstructBLIP Q-Former (+ a torch Linear as project_up). Their weights are renamed to the
released checkpoint's keys here, independently of the converter's tables.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

from tpo_jax.checkpoints.convert import convert_videochat
from test_convert_helpers import fake_videochat, load_model, real_layout_tiny
from test_parity_vit import TorchUMT

CFG = real_layout_tiny()
TOL = 1e-4


def vit_keys(ref: TorchUMT) -> dict[str, torch.Tensor]:
    out = {"vision_encoder.encoder.patch_embed.proj.weight": ref.patch.weight,
           "vision_encoder.encoder.patch_embed.proj.bias": ref.patch.bias,
           "vision_layernorm.weight": ref.norm.weight, "vision_layernorm.bias": ref.norm.bias}
    for i, layer in enumerate(ref.layers):
        p = f"vision_encoder.encoder.blocks.{i}."
        sa, o = layer.attention.attention, layer.attention.output
        out.update({
            p + "attn.qkv.weight": torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]),
            p + "attn.q_bias": sa.query.bias, p + "attn.v_bias": sa.value.bias,
            p + "attn.proj.weight": o.dense.weight, p + "attn.proj.bias": o.dense.bias,
            p + "norm1.weight": layer.layernorm_before.weight, p + "norm1.bias": layer.layernorm_before.bias,
            p + "norm2.weight": layer.layernorm_after.weight, p + "norm2.bias": layer.layernorm_after.bias,
            p + "mlp.fc1.weight": layer.intermediate.dense.weight, p + "mlp.fc1.bias": layer.intermediate.dense.bias,
            p + "mlp.fc2.weight": layer.output.dense.weight, p + "mlp.fc2.bias": layer.output.dense.bias})
    return {k: v.detach().clone() for k, v in out.items()}


def hf_qformer(cfg) -> InstructBlipQFormerModel:
    q = cfg.qformer
    config = InstructBlipQFormerConfig(
        vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads, intermediate_size=q.intermediate_size, hidden_act="gelu",
        max_position_embeddings=q.max_position, layer_norm_eps=q.norm_eps,
        cross_attention_frequency=q.cross_attention_freq, encoder_hidden_size=q.encoder_width, pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(1)
    model = InstructBlipQFormerModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale_like = "layernorm" in name.lower() and name.endswith("weight")
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if scale_like else 0.2 * torch.randn_like(p))
    return model.eval()


def qformer_keys(hf: InstructBlipQFormerModel) -> dict[str, torch.Tensor]:
    """HF names -> released names: `.attention.attention.` is the checkpoint's `.self.`, `embeddings.layernorm`
    its `embeddings.LayerNorm`, everything under the `qformer.bert.` prefix."""
    out = {}
    for name, p in hf.named_parameters():
        name = name.replace("attention.attention.", "attention.self.").replace("embeddings.layernorm",
                                                                               "embeddings.LayerNorm")
        out["qformer.bert." + name] = p.detach().clone()
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    vit = TorchUMT(CFG.vit, seed=0)
    qf = hf_qformer(CFG)
    gen = torch.Generator().manual_seed(2)
    nq, d = CFG.qformer.num_query_tokens, CFG.qformer.hidden_size
    queries = torch.randn(1, CFG.qformer.num_queries, d, generator=gen)
    project_up = torch.nn.Linear(d, CFG.llm.hidden_size)
    overrides = {**vit_keys(vit), **qformer_keys(qf), "query_tokens": queries[:, :nq].clone(),
                 "extra_query_tokens": queries[:, nq:].clone(), "project_up.weight": project_up.weight.detach().clone(),
                 "project_up.bias": project_up.bias.detach().clone()}
    src = tmp_path_factory.mktemp("vision_src")
    fake_videochat(src, CFG, overrides=overrides)
    out = tmp_path_factory.mktemp("vision_out") / "ckpt"
    convert_videochat(src, out, CFG, dtype="float32", extras=False)
    return vit, qf, queries, project_up, load_model(out, CFG)


def test_vit_forward_matches_torch(setup):
    vit, _, _, _, model = setup
    frames = np.random.default_rng(0).standard_normal((2, CFG.vit.num_frames, CFG.vit.img_size, CFG.vit.img_size, 3),
                                                     dtype=np.float32)
    with torch.no_grad():
        ref = vit(torch.from_numpy(frames)).numpy()
    got = np.asarray(model.vision(jnp.asarray(frames)))
    diff = np.abs(got - ref).max()
    print(f"ViT (23 blocks) via tpo-convert vs PyTorch: max |diff| = {diff:.2e}")
    assert got.shape == ref.shape and diff <= TOL


def test_qformer_forward_matches_torch(setup):
    _, qf, queries, project_up, model = setup
    vision = np.random.default_rng(1).standard_normal((2, 7, CFG.vit.width)).astype(np.float32)
    with torch.no_grad():
        hidden = qf(input_ids=None, query_embeds=queries.expand(2, -1, -1),
                    encoder_hidden_states=torch.from_numpy(vision))
        ref = project_up(hidden.last_hidden_state[:, :queries.shape[1]]).numpy()
    got = np.asarray(model.qformer(jnp.asarray(vision)))
    diff = np.abs(got - ref).max()
    print(f"Q-Former (12 layers) + project_up via tpo-convert vs PyTorch: max |diff| = {diff:.2e}")
    assert got.shape == (2, CFG.num_visual_tokens, CFG.llm.hidden_size) and diff <= TOL
