"""Training checkpoints with Orbax: async saves every N steps, the last K kept, exact resume.

One checkpoint step holds four items:

| item     | content                                                             | format               |
|----------|---------------------------------------------------------------------|----------------------|
| `params` | the model parameters the run has changed so far, keyed by model path | arrays (OCDBT)      |
| `state`  | the rest of the train state: step counter and optimizer state       | arrays (OCDBT)       |
| `meta`   | step, data-iterator state, counters (anything JSON)                 | JSON                 |
| `config` | the resolved run config                                             | JSON                 |

Array trees are stored as nested dicts of arrays keyed by their pytree path (`tree_to_dict`), so any
pytree (nnx.State, optax states) round-trips, and a restore only needs a target of the same structure:
abstract arrays (`jax.ShapeDtypeStruct`) that carry the *target* sharding. A checkpoint written on one
device layout is restored onto any other (8 devices → 1, 1 → 8, another mesh) this way.

Saves are atomic: Orbax writes into a temporary directory and renames it when complete, so a process
killed during a save leaves the previous checkpoints intact; the unfinished one is ignored (and
cleaned up by the next manager on that directory). A save that fails (disk full, read-only or vanished
directory) — in the background or not — surfaces at the next `save`, `check`, `wait` or `close` as one
`CheckpointWriteError` naming the step, the directory, the reason and the free space; its temporary
directory is removed and the committed checkpoints are left as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from tpo_jax.disk import free_space, quiet_write_failure_logs, write_failure
from tpo_jax.tree_paths import leaf_paths

ITEMS = ("params", "state", "meta", "config")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used as asked."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only directory, ...); earlier ones are intact."""


def write_failure_reason(e: BaseException) -> str:
    """The OS reason inside a (possibly wrapped, multi-line) write error, else its first line."""
    reason = write_failure(e)
    if reason is None and "No such file or directory" in str(e):  # the directory vanished
        reason = "No such file or directory"
    if reason is not None:
        return reason
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# --- pytrees ↔ nested dicts keyed by path --------------------------------------------------------------------------

def tree_to_dict(tree) -> dict:
    """A nested dict {key: {key: ... leaf}} with the leaves of `tree` at their paths."""
    out: dict = {}
    for path, leaf in leaf_paths(tree):
        if not path:
            raise CheckpointError("a bare array has no path; wrap it in a dict")
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
            if not isinstance(d, dict):
                raise CheckpointError(f"path {'/'.join(path)} collides with a leaf")
        if path[-1] in d:
            raise CheckpointError(f"two leaves at path {'/'.join(path)}")
        d[path[-1]] = leaf
    return out


def dict_to_tree(target, values: Mapping) -> Any:
    """`target`'s structure with each leaf replaced by `values` at its path (as made by `tree_to_dict`)."""
    def get(path):
        d = values
        for k in path:
            if not isinstance(d, Mapping) or k not in d:
                raise CheckpointError(f"checkpoint has no entry {'/'.join(path)}")
            d = d[k]
        return d

    leaves = [get(path) for path, _ in leaf_paths(target)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs of `tree`'s arrays, carrying `shardings` (a matching tree) or each array's own."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# --- the manager ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 100  # save every N steps (the last step of a stage is always saved)
    keep: int = 2  # keep the last K checkpoints
    async_save: bool = True  # write in background threads while training goes on

    def validate(self, prefix: str = "checkpoint.") -> "CheckpointConfig":
        from tpo_jax.config_fields import check_positive  # noqa: PLC0415
        check_positive(self, prefix, "every_steps", "keep")
        return self


class CheckpointManager:
    """`orbax.checkpoint.CheckpointManager` over the four items of a training checkpoint."""

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig = CheckpointConfig(), *,
                 read_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, create=not read_only,
            enable_async_checkpointing=cfg.async_save, read_only=read_only, cleanup_tmp_directories=not read_only)
        quiet_write_failure_logs()
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._pending: int | None = None  # the step of the last save started and not yet known to be on disk
        self._failed: CheckpointWriteError | None = None

    # queries
    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    # save / restore
    def save(self, step: int, *, params, state, meta: Mapping[str, Any], config: Mapping[str, Any],
             force: bool = False) -> bool:
        """Start saving step `step` (returns at once when async; `wait()` blocks until it is on disk).
        Without `force`, only steps that are multiples of `every_steps` are saved."""
        if step in self._mngr.all_steps() or not (force or self.should_save(step)):
            return False
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(tree_to_dict(params)),
            state=ocp.args.StandardSave(tree_to_dict(state)),
            meta=ocp.args.JsonSave(dict(meta)),
            config=ocp.args.JsonSave(dict(config)))
        self.wait()  # Orbax waits for the previous save anyway; its failure is reported as itself
        self._check_space(step, params, state)
        with self._writing(step):
            started = self._mngr.save(step, args=args, force=True)
        self._pending = step
        return started

    def check(self) -> None:
        """Raise `CheckpointWriteError` if a background save has failed (cheap; the training loop calls it
        every step, so a run stops at its first failed save)."""
        if self._failed is not None:
            raise self._failed
        if self._pending is not None:
            with self._writing(self._pending):
                self._mngr.check_for_errors()

    def _check_space(self, step: int, params, state) -> None:
        """Fail before writing anything when the filesystem cannot hold this checkpoint (its arrays' bytes plus 1 %
        and 1 MiB: OCDBT stores them uncompressed), instead of failing halfway through the write."""
        needed = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves((params, state)))
        needed = int(needed * 1.01) + 2**20
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return  # not a local directory: Orbax reports what goes wrong
        if free < needed:
            raise self._fail(step, OSError(errno.ENOSPC, f"No space left on device: it needs "
                                                         f"{needed / 2**20:.1f} MiB"))

    @contextlib.contextmanager
    def _writing(self, step: int):
        """Any error of writing `step` becomes the manager's one `CheckpointWriteError`."""
        try:
            yield
        except (CheckpointWriteError, CheckpointError):
            raise
        except Exception as e:  # noqa: BLE001  (Orbax / TensorStore wrap OS errors in their own types)
            raise self._fail(step, e) from e

    def _fail(self, step: int, e: BaseException) -> CheckpointWriteError:
        """The one error of a failed save: the temporary directories removed, the reason and free space named."""
        for tmp in glob.glob(os.path.join(glob.escape(self.directory), "*.orbax-checkpoint-tmp*")):
            shutil.rmtree(tmp, ignore_errors=True)
        kept = ", ".join(map(str, self.all_steps_on_disk())) or "none"
        self._failed = CheckpointWriteError(
            f"cannot write checkpoint step {step} to {self.directory}: {write_failure_reason(e)} "
            f"({free_space(self.directory)}); the committed checkpoints (steps: {kept}) are intact")
        self._pending = None
        return self._failed

    def all_steps_on_disk(self) -> list[int]:
        """Committed checkpoint steps, read from the directory listing (not Orbax's cached view)."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

    def should_save(self, step: int) -> bool:
        """True for the multiples of `every_steps`."""
        return step > 0 and step % self.cfg.every_steps == 0

    def restore(self, step: int | None = None, *, params=None, state=None) -> dict[str, Any]:
        """Items of checkpoint `step` (default: the latest): `meta` and `config` always; `params` / `state`
        when a target is given — a pytree of abstract arrays (`abstract_like`) whose shardings say where the
        restored arrays go. Returns {"step", "meta", "config", "params"?, "state"?}."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step not in self._mngr.all_steps():
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; have {self.all_steps()}")
        args = {"meta": ocp.args.JsonRestore(), "config": ocp.args.JsonRestore()}
        targets = {"params": params, "state": state}
        for name, target in targets.items():
            if target is not None:
                args[name] = ocp.args.StandardRestore(_restore_target(target))
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not match the restore target: {e}") from e
        result = {"step": step, "meta": dict(out["meta"]), "config": dict(out["config"])}
        for name, target in targets.items():
            if target is not None:
                result[name] = dict_to_tree(target, out[name])
        return result

    def read_json(self, step: int | None = None) -> dict[str, Any]:
        """Only the `meta` and `config` items of a checkpoint (no arrays read)."""
        return self.restore(step)

    def wait(self) -> None:
        """Block until every started save is on disk (`CheckpointWriteError` if one failed)."""
        if self._failed is not None:
            raise self._failed
        if self._pending is not None:
            with self._writing(self._pending):
                self._mngr.wait_until_finished()
            self._pending = None

    def close(self) -> None:
        """Wait for the started saves and release Orbax's threads. A failed save raises `CheckpointWriteError`
        once: a manager that already raised it closes quietly (so a `finally: close()` never hides the error)."""
        try:
            if self._failed is None:
                self.wait()
        finally:
            try:
                self._mngr.close()
            except Exception:  # noqa: BLE001  (the save's error was raised by wait(); this is its echo)
                if self._failed is None:
                    raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _restore_target(target):
    """Nested dict of ShapeDtypeStructs; a leaf without sharding is restored onto the first local device."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x):
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return tree_to_dict(jax.tree.map(one, target))
