"""One process of the multi-process `init_from` test (tests/test_init_from_multihost.py).

    python tests/multihost_init_worker.py --process-id 0 --num-processes 2 --port 12345 --source DIR --workdir DIR

Joins `jax.distributed` on localhost (2 processes × 4 CPU devices), runs `tpo-train`'s job for 2 steps of
stage 1 from the converted checkpoint `--source` (written per layer; the model scans its stacks, so every
stacked parameter is read across layouts, shard by shard), and prints one JSON line: every read of a stored
array this process made (name, the extent it read) and the shapes of its addressable shards of the loaded
state, so the test can check that it read nothing outside its own shards.
"""

import argparse
import json

from multihost_helper import join_localhost, worker_arguments


def run_config(source: str):
    from tpo_jax import config as C
    from tpo_jax.checkpoints.manager import CheckpointConfig
    from tpo_jax.data.pipeline import DataConfig
    from tpo_jax.train.run_config import EvalConfig, RunConfig, StageRun
    model = C.replace(C.get_config("tiny"), **{f"{s}.stack.scan_layers": True for s in ("llm", "vit", "qformer")})
    # stage 1 (LoRA, LM loss only): the cheapest step to compile; the heads' compile is tested single-process
    return RunConfig(model=model, data=DataConfig(batch_size=4, seq_len=128), stage1=StageRun("stage1", steps=2),
                     eval=EvalConfig(enabled=False), dropout=False, init_from=(source,), sharded_init=True,
                     checkpoint=CheckpointConfig(every_steps=2, keep=1)).validate()


def main() -> None:
    p = argparse.ArgumentParser()
    worker_arguments(p)
    p.add_argument("--source", required=True)
    p.add_argument("--workdir", required=True)
    args = p.parse_args()

    join_localhost(args, devices=4)

    import jax
    from tpo_jax.train.distributed import shutdown

    import numpy as np
    from tpo_jax.checkpoints import orbax_io
    from tpo_jax.train.trainer import run

    reads = []
    original = orbax_io.ArrayReader.read

    def recording_read(self, name, index=None):
        out = original(self, name, index)
        reads.append({"name": name, "shape": list(np.shape(out))})
        return out

    orbax_io.ArrayReader.read = recording_read
    summary = run(run_config(args.source), args.workdir, stages=("stage1",), progress=False)
    print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                      "local_devices": jax.local_device_count(), "reads": reads,
                      "losses": summary["stages"]["stage1"]["losses"]}), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
