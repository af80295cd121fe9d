"""One process of the multi-process training test (tests/test_multihost.py).

    python tests/multihost_worker.py --process-id 0 --num-processes 2 --port 12345 --devices 4 --steps 3

Joins `jax.distributed` on localhost (gloo CPU collectives), builds the tiny model directly in its
FSDP shards over every device of every process, feeds this process's rows of a fixed batch and
prints the per-step total losses as one JSON line (process 0 only).
"""

import argparse
import json

from multihost_helper import join_localhost, worker_arguments

BATCH_TASKS = ("region", "conversation")


def settings():
    """(model config, train config) shared by the workers and the single-process reference."""
    from tpo_jax import config as C
    from tpo_jax.train.optim import OptimConfig
    from tpo_jax.train.step import TrainConfig
    # stage 2 (region): LoRA, region head and box token train; a small step that compiles quickly
    train_cfg = TrainConfig(stage="stage2_region", dropout=True,
                            optim=OptimConfig(total_steps=10, warmup_ratio=0.0, lr_scale=50.0))
    return C.get_config("tiny"), train_cfg


def main() -> None:
    p = argparse.ArgumentParser()
    worker_arguments(p)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()

    join_localhost(args, devices=args.devices)

    import jax
    from tpo_jax.train.distributed import is_main_process, shutdown

    from tpo_jax.data.synthetic import synthetic_batch
    from tpo_jax.sharding import MeshConfig, data_shard_for_process, get_rules, make_mesh, shard_batch
    from tpo_jax.train.step import init_sharded, make_train_step

    CFG, TRAIN_CFG = settings()
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    graphdef, state, frozen, tx, sh = init_sharded(CFG, TRAIN_CFG, mesh, get_rules("fsdp"), seed=0)
    step = make_train_step(graphdef, tx, CFG, TRAIN_CFG, shardings=sh)
    full = synthetic_batch(CFG, args.batch, seed=0, tasks=BATCH_TASKS)
    index, count = data_shard_for_process(mesh)
    rows = args.batch // count
    local = {k: v[index * rows:(index + 1) * rows] for k, v in full.items()}
    losses = []
    for i in range(args.steps):
        state, metrics = step(state, frozen, shard_batch(local, mesh), jax.random.key(i))
        losses.append(float(metrics["loss/total"]))
    if is_main_process():
        print(json.dumps({"losses": losses, "devices": jax.device_count(), "processes": jax.process_count(),
                          "local_rows": rows}), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
