#!/usr/bin/env bash
# The 7B sharding reports of docs/sharding.md: VideoChat-TPO 7B (the videochat_tpo_7b preset: scanned stacks,
# bf16 compute, bf16 frozen weights) on TPU slices, compiled ahead of time by libtpu on this CPU machine
# (pip install -e ".[tpu-aot]"; no TPU needed). Per slice and stage, a search for the paper's global batch of 128.
# Each full-depth 7B compile takes ~3-8 min on a 2-core CPU; a search reuses the plans its JSON already holds,
# so an interrupted run continues where it stopped. Usage: benchmarks/shard_report_7b.sh [TOPOLOGY...]
set -euo pipefail
cd "$(dirname "$0")/.."
# v5p-8 (4 chips), the 8-chip v5p slice of docs/benchmarks.md, v5p-64 (32 chips), v5e-256, v6e-64
topologies=("${@:-v5p:2x2x1 v5p:2x2x2 v5p:2x4x4 v5e:16x16 v6e:8x8}")
for topo in ${topologies[@]}; do
  for stage in stage1 stage2 stage3; do
    python -m tpo_jax.cli.shard_report --config videochat_tpo_7b --stage "$stage" --topology "$topo" \
      --search --global-batch 128 --strategies fsdp --out "docs/sharding/7b_${topo/:/_}_${stage}"
  done
done
