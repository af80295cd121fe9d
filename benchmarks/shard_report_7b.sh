#!/usr/bin/env bash
# The sharding report of docs/sharding.md: VideoChat-TPO 7B, stage 3, on fake CPU devices (nothing allocated).
# Writes docs/sharding_report_7b.{md,png,json}. Takes ~1-2 h on a 2-core CPU (XLA:CPU compiles).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH=. python -m tpo_jax.cli.shard_report --config videochat_tpo_7b --stage stage3 \
  --plans fsdp:1x8x1,tp:1x1x8,fsdp_tp:1x4x2,fsdp:1x16x1,fsdp:1x64x1,dp:8x1x1 \
  --dtype bfloat16 --frozen-dtype bfloat16 --layers 1,2 --seq-len 512 --batch-per-shard 1 \
  --out docs/sharding_report_7b
