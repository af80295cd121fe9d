"""Reading compiled HLO text (tpo_jax.train.hlo): collectives by kind, and how often each runs per step."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tpo_jax.train import hlo as H


HLO = """
  %all-gather.1 = f32[64,128]{1,0} all-gather(f32[8,128]{1,0} %p), channel_id=1, dimensions={0}
  %ag-start = (bf16[4,8]{1,0}, bf16[32,8]{1,0}) all-gather-start(bf16[4,8]{1,0} %q), dimensions={0}
  %ag-done = bf16[32,8]{1,0} all-gather-done((bf16[4,8]{1,0}, bf16[32,8]{1,0}) %ag-start)
  all-reduce.7 = (f32[10]{0}, s32[3,3]{1,0}, f32[1]{0}, f32[1]{0}, f32[1]{0}, /*index=5*/f32[2,2]{1,0}) all-reduce(f32[10]{0} %a, s32[3,3]{1,0} %b, f32[1]{0} %c, f32[1]{0} %d, f32[1]{0} %e, /*index=5*/f32[2,2]{1,0} %f), to_apply=%add
  %fusion.9 = f32[10]{0} fusion(f32[10]{0} %all-reduce.7), kind=kLoop, calls=%fused_computation
  %reduce-scatter.2 = bf16[16]{0} reduce-scatter(bf16[128]{0} %g), dimensions={0}
  %collective-permute.3 = f32[2,2]{1,0} collective-permute(f32[2,2]{1,0} %x), source_target_pairs={{0,1}}
  %fusion.all-reduce-like = f32[4]{0} fusion(f32[4]{0} %y), calls=%fused_all-reduce
"""


def test_collective_stats_from_hlo_text():
    stats = H.collective_stats(HLO)
    assert stats["all-gather"] == {"count": 2, "bytes": 64 * 128 * 4 + 32 * 8 * 2}
    assert stats["all-reduce"] == {"count": 1, "bytes": (10 + 9 + 3 + 4) * 4}
    assert stats["reduce-scatter"] == {"count": 1, "bytes": 32}
    assert stats["collective-permute"] == {"count": 1, "bytes": 16}
    assert stats["all-to-all"] == {"count": 0, "bytes": 0}



LOOP = """HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %g = f32[32]{0} all-gather(f32[8]{0} %v), dimensions={0}
  %r = f32[8]{0} all-reduce(f32[8]{0} %v), to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %r)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%data_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %r2 = f32[8]{0} all-reduce(f32[8]{0} %v), to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %r2)
}

%data_cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %a = f32[] get-tuple-element(%p), index=1
  ROOT %lt = pred[] compare(%a, %a), direction=LT
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  %w2 = (s32[], f32[8]{0}) while(%init), condition=%data_cond, body=%data_body
  ROOT %c = f32[8]{0} collective-permute(f32[8]{0} %x), source_target_pairs={{0,1}}
}
"""


def test_loop_bodies_count_once_per_trip():
    times, unknown = H.multipliers(LOOP)
    assert times["main"] == 1 and times["body"] == 12 and times["add"] == 12 + 1  # the reducer of both all-reduces
    assert unknown == ["data_body"] and times["data_body"] == 1  # data-dependent trip count: once, and said so
    static, per_step = H.collective_stats(LOOP), H.collective_stats(LOOP, per_step=True)
    assert static["all-reduce"] == {"count": 2, "bytes": 2 * 32} and static["all-gather"]["count"] == 1
    assert per_step["all-gather"] == {"count": 12, "bytes": 12 * 128}
    assert per_step["all-reduce"] == {"count": 13, "bytes": 13 * 32}
    assert per_step["collective-permute"] == {"count": 1, "bytes": 32}


def test_per_step_collectives_of_a_compiled_scan():
    # a scanned stack of 5 fsdp-sharded layers: each trip gathers its layer's weight; XLA keeps the loop
    mesh = jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,))

    def f(ws, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    ws = jax.ShapeDtypeStruct((5, 64, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp", None)))
    x = jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    text = jax.jit(f, out_shardings=NamedSharding(mesh, P("fsdp"))).lower(ws, x).compile().as_text()
    assert H.while_loops(text) == 1
    static, per_step = H.collective_stats(text), H.collective_stats(text, per_step=True)
    gathers = static["all-gather"]["count"]
    assert gathers >= 1
    assert per_step["all-gather"]["count"] == 5 * gathers
    assert per_step["all-gather"]["bytes"] == 5 * static["all-gather"]["bytes"]
    assert np.isclose(static["all-gather"]["bytes"] / gathers, 64 * 64 * 4)  # one whole layer per gather
