"""Training from pretrained weights (`init_from`), end to end at tiny widths: a random checkpoint in the released
VideoChat-TPO layout → tpo-convert → 5 steps of stage 3 → export back to the VideoChat-TPO layout and to Hugging
Face + PEFT; a Hugging Face Mistral + PEFT adapter as the LLM source; and every bad source as one clear error that
leaves the work directory as it was."""

from __future__ import annotations

import gc
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from tpo_jax import config as C
from tpo_jax.checkpoints.convert import convert_hf, convert_videochat
from tpo_jax.checkpoints.export import ParamSet, export_hf, export_videochat
from tpo_jax.checkpoints.manager import CheckpointConfig
from tpo_jax.checkpoints.orbax_io import LazyArray, saved_arrays, write_streaming
from tpo_jax.config import ConfigError
from tpo_jax.model import abstract_model, stack_layouts
from tpo_jax.sharding import MeshConfig, get_rules, make_mesh, shard_batch, tree_shardings
from tpo_jax.stack import stack_rest
from tpo_jax.data.pipeline import DataConfig, make_train_iterator
from tpo_jax.train.init_from import INIT_REPORT_FILE
from tpo_jax.train.load import export_params, load_model
from tpo_jax.train.run_config import EvalConfig, RunConfig, StageRun
from tpo_jax.train.stages import get_recipe, param_group
from tpo_jax.train.step import TrainState, split_model
from tpo_jax.train.trainer import Trainer, run

from multihost_helper import check_exit, free_port, run_workers
from test_convert_helpers import exported_tensors, fake_videochat, real_keys, source_shapes

CFG = C.replace(C.get_config("tiny"), **{f"{s}.stack.scan_layers": True for s in ("llm", "vit", "qformer")})
STEPS = 5
# the released stacks' key prefixes, and the tiny model's depth of each
STACKS = {"lm.base_model.model.model.layers.": CFG.llm.num_layers, "vision_encoder.encoder.blocks.": CFG.vit.depth,
          "qformer.bert.encoder.layer.": CFG.qformer.num_layers}


def _tiny_keys() -> dict[str, str]:
    """The released key set with the LLM, ViT and Q-Former stacks cut to the tiny model's depth, and the tiny
    SAM2's own upstream keys (its Hiera stages differ from Hiera-L's, so a cut of the release's would not fit)
    in the release's SAM2 shard."""
    def keep(key):
        for prefix, depth in STACKS.items():
            if key.startswith(prefix):
                return int(key[len(prefix):].split(".", 1)[0]) < depth
        return not key.startswith("sam.")
    released = real_keys()
    keys = {k: v for k, v in released.items() if keep(k)}
    keys.update({k: released["sam.no_mem_embed"] for k in source_shapes(CFG) if k.startswith("sam.")})
    return keys


def _run_cfg(init_from, **kw) -> RunConfig:
    fields = dict(model=CFG, data=DataConfig(batch_size=4, seq_len=128), stage3=StageRun("stage3", steps=STEPS),
                  eval=EvalConfig(enabled=False), dropout=False, init_from=tuple(map(str, init_from)),
                  checkpoint=CheckpointConfig(every_steps=STEPS, keep=1), devices=4)
    fields.update(kw)
    return RunConfig(**fields).validate()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(source tensors, converted directory) of a random checkpoint with every released key."""
    root = tmp_path_factory.mktemp("released")
    # the LLM at a trained model's scale (std 0.02 weights, norms near 1), so its logits are O(1)
    gen = torch.Generator().manual_seed(1)
    llm = {k: (1.0 + 0.1 * torch.randn(s, generator=gen) if "norm" in k else 0.02 * torch.randn(s, generator=gen))
           .to(torch.bfloat16) for k, s in source_shapes(CFG).items() if k.startswith("lm.")}
    tensors = fake_videochat(root / "src", CFG, overrides=llm, keys=_tiny_keys())
    convert_videochat(root / "src", root / "converted", CFG)
    return tensors, root / "converted"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, released):
    """The work directory of 5 stage-3 steps started from the converted checkpoint (no stage 1 or 2 here)."""
    _, converted = released
    workdir = tmp_path_factory.mktemp("run") / "work"
    cfg = _run_cfg([converted])
    summary = run(cfg, str(workdir), stages=("stage3",), progress=False)
    return cfg, workdir, summary


def _first_batch(cfg: RunConfig) -> dict:
    it = make_train_iterator(cfg.data_config("stage3"), cfg.model, cfg.stage3.recipe)
    try:
        return next(it)
    finally:
        it.close()


def _source_groups(converted) -> dict[str, str]:
    """Source key -> the parameter group its converted tensor belongs to (conversion.json's key map)."""
    report = json.loads((converted / "conversion.json").read_text())
    out = {}
    for srcs, dsts in report["mapped"].items():
        (group,) = {param_group(tuple(d.split("[")[0].split("."))) for d in dsts}
        out.update({s: group for s in srcs.split(", ")})
    return out


def test_first_step_loss_is_the_converted_models_loss(trained, released, tmp_path):
    cfg, workdir, summary = trained
    _, converted = released
    assert len(summary["stages"]["stage3"]["losses"]) == STEPS
    # the converted model, loaded on its own and evaluated without training, by the run's (cached) train step
    model, _ = load_model(str(converted))
    _, params, frozen = split_model(model, get_recipe("stage3"))
    trainer = Trainer(cfg, str(tmp_path), progress=False)
    graphdef, _, _, tx, sh = trainer._build_initial("stage3")
    state = jax.device_put(TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)),
                           sh.state)
    step_fn = trainer.compiled_train_step(graphdef, tx, "stage3", sh)
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 2), 0)
    _, metrics = step_fn(state, jax.device_put(frozen, sh.frozen), shard_batch(_first_batch(cfg), trainer.mesh), rng)
    first = json.loads((workdir / "stage3" / "history.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    print(f"first-step loss {first['loss/total']:.7f}, converted model {float(metrics['loss/total']):.7f}")
    np.testing.assert_allclose(first["loss/total"], float(metrics["loss/total"]), rtol=1e-5)
    # the report: everything came from the one source, nothing from the seed
    report = json.loads((workdir / INIT_REPORT_FILE).read_text())
    assert report["initialised_tensors"] == 0 and report["loaded_tensors"] > 0
    assert report["sources"][0]["kind"] == "videochat" and report["sources"][0]["unused_arrays"] == 0


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The trained model exported to the VideoChat-TPO layout, in float32 (the trained values as they are)."""
    _, workdir, _ = trained
    out = tmp_path_factory.mktemp("export") / "vc"
    return out, export_videochat(export_params(str(workdir)), out)


def _frozen_keys(tensors, converted, recipe: str = "stage3") -> set[str]:
    """Source keys of the tensors `recipe` does not train (SAM2 and the unused modules, kept as extras, included)."""
    groups = _source_groups(converted)
    trainable = get_recipe(recipe).trainable_groups
    return {k for k in tensors if groups.get(k) not in trainable}


def test_export_frozen_bit_identical_trainable_changed(trained, released, exported, tmp_path):
    _, workdir, _ = trained
    tensors, converted = released
    frozen_keys = _frozen_keys(tensors, converted)
    # in the released storage dtype (bf16), every frozen tensor comes back bit for bit
    back = exported_tensors(export_videochat(export_params(str(workdir)), tmp_path / "vc", dtype="bfloat16"))
    assert set(back) == set(tensors)  # every released key, SAM2 and the unused modules included
    assert all(back[k].dtype == tensors[k].dtype for k in tensors)
    assert all(torch.equal(back[k], tensors[k]) for k in frozen_keys), \
        sorted(k for k in frozen_keys if not torch.equal(back[k], tensors[k]))[:5]
    # in float32, the trainable tensors moved (5 steps at 2e-5 can stay within one bf16 rounding step): every
    # matrix (AdamW decays them even where a batch gives no gradient), and the vectors with a gradient. Vectors
    # (biases, norms: no weight decay) whose gradient is exactly zero stay put: attention key biases (softmax
    # ignores them, up to rounding), the Q-Former's text-path FFN (no text input here), heads' parts these 5
    # batches never reach.
    back32 = exported_tensors(exported[1])
    trainable_keys = set(tensors) - frozen_keys
    unchanged = {k for k in trainable_keys if torch.equal(back32[k], tensors[k].float())}
    print(f"{len(frozen_keys)} frozen tensors bit-identical; {len(trainable_keys) - len(unchanged)} of "
          f"{len(trainable_keys)} trainable changed")
    assert all(tensors[k].ndim == 1 for k in unchanged), sorted(k for k in unchanged if tensors[k].ndim > 1)
    assert len(unchanged) <= 0.15 * len(trainable_keys)


def test_export_reloads_in_our_loader_and_in_peft(trained, exported, tmp_path):
    cfg, workdir, _ = trained
    model, _ = load_model(str(workdir))
    batch = {k: jnp.asarray(v) for k, v in _first_batch(cfg).items()}
    kw = dict(visual_mask=batch["visual_mask"], frames=batch["frames"], attention_mask=batch["attention_mask"])
    want = np.asarray(model(batch["input_ids"], **kw).logits)
    # VideoChat-TPO layout → tpo-convert → our loader
    convert_videochat(exported[0], tmp_path / "reconverted", CFG)
    again, _ = load_model(str(tmp_path / "reconverted"))
    assert np.abs(np.asarray(again(batch["input_ids"], **kw).logits) - want).max() <= 1e-4
    # the LLM part → Hugging Face + PEFT adapter → transformers / peft
    export_hf(export_params(str(workdir)), tmp_path / "hf", peft=True)
    base = transformers.MistralForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                           attn_implementation="eager")
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()
    ids = np.random.default_rng(0).integers(0, CFG.llm.vocab_size, (2, 11))
    with torch.no_grad():
        ref = reloaded(input_ids=torch.tensor(ids)).logits.float().numpy()
    ours = np.asarray(model.llm(jnp.asarray(ids)).logits)
    print(f"trained LLM vs transformers + peft (exported): max |diff| = {np.abs(ours - ref).max():.2e}")
    assert np.abs(ours - ref).max() <= 1e-4


def test_a_work_directory_as_source_gives_its_trained_model(trained, tmp_path):
    """`init_from` = an earlier run: its own source, then what its last checkpoint trained."""
    cfg, workdir, _ = trained
    want = {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(load_model(str(workdir))[0], nnx.Param))}
    trainer = Trainer(_run_cfg([workdir]), str(tmp_path / "next"), progress=False)
    _, state, frozen, _, _ = trainer.build_stage("stage3")
    got = {".".join(map(str, p)): np.asarray(v.get_value()) for tree in (state.params, frozen)
           for p, v in nnx.to_flat_state(tree)}
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg=p)
    report = trainer.init_plan().report
    assert [s["kind"] for s in report["sources"]] == ["videochat", "workdir"]
    assert report["sources"][1]["checkpoint"] == f"stage3 step {STEPS}" and report["initialised_tensors"] == 0


# ------------------------------------------------------------------------------------------------ Hugging Face

def _hf_mistral(tmp_path, vocab: int):
    """A random Mistral at the tiny LLM's shapes with the base vocabulary, and a PEFT adapter for it."""
    llm = CFG.llm
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=vocab, hidden_size=llm.hidden_size, num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        intermediate_size=llm.intermediate_size, rope_theta=llm.rope_theta, rms_norm_eps=llm.rms_norm_eps,
        max_position_embeddings=llm.max_position, sliding_window=llm.sliding_window, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                    target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    return {k: v.float().numpy() for k, v in merged.state_dict().items()}


def test_hf_mistral_with_adapter_extends_the_vocabulary(tmp_path):
    source = _hf_mistral(tmp_path, vocab=32000)
    convert_hf(tmp_path / "hf", tmp_path / "conv", adapter=tmp_path / "adapter", lora="merge", scan_layers=True)
    cfg = _run_cfg([tmp_path / "conv"])
    trainer = Trainer(cfg, str(tmp_path / "work"), progress=False)
    _, state, frozen, _, _ = trainer.build_stage("stage1")
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for tree in (state.params, frozen)
            for p, v in nnx.to_flat_state(tree)}
    # the loaded LLM back in Hugging Face names (export inverts the tables; LoRA B starts at zero, so merging adds 0)
    llm = {p: v for p, v in flat.items() if p.startswith("llm.")}
    back = {k: v.float().numpy() for k, v in exported_tensors(export_hf(ParamSet(llm, (CFG.llm, CFG.lora)),
                                                                        tmp_path / "back")).items()}
    assert set(back) == set(source)
    for key in sorted(source):  # everything but the two vocabulary tables equals the (adapter-merged) source
        if key not in ("model.embed_tokens.weight", "lm_head.weight"):
            np.testing.assert_array_equal(back[key], source[key], err_msg=key)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # (vocab, hidden) in HF layout
        np.testing.assert_array_equal(back[key][:32000], source[key], err_msg=key)
        # the 7 new rows: the mean of the old ones (float64 reference; ours sums blocks of rows in float64)
        mean = source[key].astype(np.float64).mean(0)
        np.testing.assert_allclose(back[key][32000:], np.broadcast_to(mean, (7, mean.size)), rtol=0, atol=1e-8,
                                   err_msg=key)
    report = trainer.init_plan().report
    assert report["sources"][0]["kind"] == "hf" and "llm.embed_tokens.embedding" in report["sources"][0][
        "vocabulary_extended"]
    assert set(report["initialised"]) >= {"vision", "connector", "region_head"}  # no LLM source gives those
    assert "llm" not in report["initialised"]


# ------------------------------------------------------------------------------------------------ bad sources

def _tree(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    _hf_mistral(root, vocab=32768)
    convert_hf(root / "hf", root / "conv")
    return root / "conv"


def _truncated(tmp_path, converted):
    copy = tmp_path / "truncated"
    shutil.copytree(converted, copy)
    data = max((p for p in (copy / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return copy


def _covers_nothing(tmp_path, converted):
    """A converted checkpoint whose arrays have none of the model's parameter names."""
    src = tmp_path / "foreign"
    src.mkdir()
    shutil.copy(converted / "conversion.json", src / "conversion.json")
    write_streaming(src / "params", {"encoder": {"w": LazyArray(lambda: np.ones((3, 2), np.float32), (3, 2),
                                                                np.float32, 24)}})
    return src


# a truncated array fails some of Orbax's concurrent reads after the first error has been raised; their late
# exceptions (no event loop left to report to) are collected here rather than leaking into later tests
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", ["missing", "other_kind", "architecture", "vocabulary", "covers_nothing",
                                  "truncated"])
def test_bad_source_is_one_clear_error_and_leaves_the_workdir(case, tmp_path, released, other_vocab):
    _, converted = released
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("kept")
    model = CFG
    if case == "missing":
        src, expect = tmp_path / "nope", "no such file or directory"
    elif case == "other_kind":
        (tmp_path / "plain").mkdir()
        src, expect = tmp_path / "plain", "neither a converted checkpoint"
    elif case == "architecture":  # the released layout, a model of other widths
        model = C.replace(CFG, **{"llm.intermediate_size": 160})
        src, expect = converted, "160"
    elif case == "vocabulary":
        src, expect = other_vocab, "a vocabulary of 32768 tokens, the model has 32007"
    elif case == "covers_nothing":
        src, expect = _covers_nothing(tmp_path, converted), "covers none of the model's"
    else:
        src, expect = _truncated(tmp_path, converted), "truncated or damaged"
    before = _tree(workdir)
    with pytest.raises(ConfigError) as err:
        run(_run_cfg([src], model=model), str(workdir), stages=("stage3",), progress=False)
    message = str(err.value)
    print(case, "->", message)
    assert message.startswith(f"config field 'init_from': {src}") and expect in message
    assert len(message.splitlines()) == 1
    assert _tree(workdir) == before
    del err
    gc.collect()


# ------------------------------------------------------------------------------------------------ multi-host

@pytest.mark.slow
def test_two_processes_read_only_their_shards_and_export(released, tmp_path):
    """2 processes × 4 devices train stage 1 from a per-layer checkpoint into the scanned model: every read is one
    of this process's device shards of a parameter (of one layer, for the stacked ones), never a whole tensor
    that is split; the checkpoint both processes wrote exports on one host, frozen tensors bit for bit."""
    tensors, _ = released
    unrolled = C.replace(CFG, **{f"{s}.stack.scan_layers": False for s in ("llm", "vit", "qformer")})
    source = tmp_path / "per_layer"
    convert_videochat(released[1].parent / "src", source, unrolled)
    stored = saved_arrays(source / "params")
    workdir = tmp_path / "work"
    port = free_port()
    args = [["--process-id", str(i), "--num-processes", "2", "--port", str(port), "--source", str(source),
             "--workdir", str(workdir)] for i in range(2)]
    outs = run_workers("multihost_init_worker.py", args, tmp_path)
    check_exit(outs)
    results = [json.loads([line for line in out.splitlines() if line.startswith("{")][-1]) for _, out, _ in outs]
    assert [r["devices"] for r in results] == [8, 8] and [r["local_devices"] for r in results] == [4, 4]
    # the shard of each layer that one device of the 8 holds, from the same mesh and rules as the run
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    params = nnx.state(abstract_model(CFG), nnx.Param)
    shardings = tree_shardings(params, mesh, get_rules("fsdp"))
    layouts = stack_layouts(CFG)
    expected = {}
    for (path, value), (_, sharding) in zip(nnx.to_flat_state(params), nnx.to_flat_state(shardings)):
        value, sharding = value.get_value(), sharding.get_value() if hasattr(sharding, "get_value") else sharding
        found = stack_rest(layouts, ".".join(map(str, path)))
        if found is not None:  # stored per layer: each layer's part of the device's shard
            layout, rest = found
            shard = sharding.shard_shape(value.shape)[1:]
            for g in range(layout.count):
                expected[layout.unrolled_path(rest, g)] = list(shard)
        else:
            expected[".".join(map(str, path))] = list(sharding.shard_shape(value.shape))
    for r in results:
        assert r["reads"], "every parameter is read shard by shard"
        wrong = [(x["name"], x["shape"], expected.get(x["name"])) for x in r["reads"]
                 if x["shape"] != expected.get(x["name"])]
        assert not wrong, wrong[:5]
        assert {x["name"] for x in r["reads"]} == set(expected)  # every parameter, every layer of the stacked ones
        split = [x for x in r["reads"] if np.prod(x["shape"]) < np.prod(stored[x["name"]][0])]
        assert split, "some reads are a part of their array (the FSDP-split ones)"
    print(f"process reads: {len(results[0]['reads'])} device shards each; losses {results[0]['losses']}")
    # the checkpoint the two processes wrote together exports on one host
    back = exported_tensors(export_videochat(export_params(str(workdir)), tmp_path / "vc", dtype="bfloat16"))
    frozen = _frozen_keys(*released, recipe="stage1")  # the workers trained stage 1: LoRA
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in frozen)
    assert not all(torch.equal(back[k], tensors[k]) for k in set(tensors) - frozen)  # and LoRA trained
