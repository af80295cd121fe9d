#!/usr/bin/env bash
# The 7B sharding reports of docs/sharding.md: VideoChat-TPO 7B (the videochat_tpo_7b preset: scanned stacks,
# bf16 compute, bf16 frozen weights) on TPU slices, compiled ahead of time by libtpu on this CPU machine
# (pip install -e ".[tpu-aot]"; no TPU needed), for the paper's global batch of 128.
#
# Per slice and stage, a search narrowed to the plan the 8-chip stage-3 search and the per-example memory point
# to (docs/sharding.md explains each choice): the mesh (--plans), the remat policies (--remat) and the first
# micro-batch count (--micro-batches); the search still raises micro-batches or moves to the next policy until
# the step fits. Each full-depth 7B compile takes 3-20 min on a 2-core CPU; a search reuses the plans its JSON
# already holds, so an interrupted run continues where it stopped. Usage: benchmarks/shard_report_7b.sh
set -euo pipefail
cd "$(dirname "$0")/.."
D=dots_with_no_batch_dims_saveable
run() { # topology stage strategies plans remat first-micro-batches [extra args]
  local topo=$1 stage=$2 strategies=$3 plans=$4 remat=$5 micro=$6
  shift 6
  python -m tpo_jax.cli.shard_report --config videochat_tpo_7b --stage "$stage" --topology "$topo" --search \
    --global-batch 128 --strategies "$strategies" --plans "$plans" --remat "$remat" --micro-batches "$micro" \
    --out "docs/sharding/7b_${topo/:/_}_${stage}" "$@"
}
# the 8-chip slice: the full fsdp search (every data x fsdp mesh, every remat policy)
python -m tpo_jax.cli.shard_report --config videochat_tpo_7b --stage stage3 --topology v5p:2x2x2 --search \
  --global-batch 128 --strategies fsdp --out docs/sharding/7b_v5p_2x2x2_stage3
# v5p-8 (4 chips, 32 examples each), v5p-64 (32 chips, 4 each), v6e-64 (64 chips, 2 each)
run v5p:2x2x1 stage3 fsdp fsdp:1x4x1 none 8
run v5p:2x2x1 stage1 fsdp fsdp:1x4x1 none 2
run v5p:2x2x1 stage2 fsdp fsdp:1x4x1 none 2
run v5p:2x4x4 stage3 fsdp fsdp:1x32x1 none 1
run v5p:2x4x4 stage1 fsdp fsdp:1x32x1 none 1
run v5p:2x4x4 stage2 fsdp fsdp:1x32x1 none 1
run v6e:8x8 stage3 fsdp fsdp:1x64x1 "$D" 1
run v6e:8x8 stage1 fsdp fsdp:1x64x1 "none,$D" 1
run v6e:8x8 stage2 fsdp fsdp:1x64x1 "none,$D" 1
# v5e-256: 128 examples on 256 chips need tensor parallelism; libtpu 0.0.42 aborts in its all-gather
# simplifier on this program (collective_opt_utils.cc: "Check failed: constant->opcode() == kConstant"), so
# that one pass is disabled
for stage in stage1 stage3 stage2; do
  run v5e:16x16 "$stage" fsdp_tp fsdp_tp:1x128x2 "none,$D" 1 --xla-option xla_disable_hlo_passes=all-gather-simplifier
done
