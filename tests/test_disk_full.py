"""A full disk or a read-only work directory: one clear error naming the path and the free space, training stops
at the first failed save, no temporary directory is left, and the committed checkpoints still restore; the same
for tpo-convert's output. Real full / read-only filesystems are small tmpfs mounts (skipped where mounting is not
allowed); the others patch the writer."""

import json
import os
import subprocess
import shutil

import numpy as np
import pytest

from tpo_jax.checkpoints import manager as M
from tpo_jax.cli.convert import main as convert_main
from tpo_jax.cli.train import train_main
from tpo_jax.data.records import DataError
from tpo_jax.train import report

BASE = ["stage1.steps=8", "checkpoint.every_steps=2", "checkpoint.keep=10", "data.batch_size=2", "devices=1",
        "eval.enabled=false"]
ARGS = ["--stages", "1", "--no-progress"] + [a for o in BASE for a in ("--set", o)]


def _ckpt_dir(workdir):
    return os.path.join(workdir, "stage1", "checkpoints")


def _history_steps(workdir):
    return [r["step"] for r in report.read_jsonl(os.path.join(workdir, "stage1", "history.jsonl"))]


def _leftovers(workdir):
    return [os.path.join(r, d) for r, ds, _ in os.walk(workdir) for d in ds if "tmp" in d]


def _one_error_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def _resume_completes(workdir, capsys):
    """`--resume` (disk healthy again) continues from the last committed checkpoint and finishes the stage."""
    assert train_main(["--workdir", workdir, "--resume"] + ARGS) == 0
    capsys.readouterr()
    with M.CheckpointManager(_ckpt_dir(workdir), read_only=True) as m:
        assert m.all_steps()[-1] == 8
    assert _history_steps(workdir) == list(range(1, 9))


def test_a_disk_too_full_for_the_next_checkpoint_stops_the_run_before_writing(tmp_path, capsys, monkeypatch):
    workdir = str(tmp_path / "run")
    real = shutil.disk_usage

    def usage(path):  # once step 2 is committed the disk has 5 MiB left (a tiny stage-1 checkpoint needs ~27 MiB)
        u = real(path)
        return u._replace(free=5 * 2**20) if os.path.isdir(os.path.join(_ckpt_dir(workdir), "2")) else u

    monkeypatch.setattr(M.shutil, "disk_usage", usage)
    assert train_main(["--workdir", workdir] + ARGS) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"tpo-train: training stopped: cannot write checkpoint step 4 to {_ckpt_dir(workdir)}: "
                           f"No space left on device: it needs "), line
    assert "(5.0 MiB free of " in line and line.endswith("the committed checkpoints (steps: 2) are intact")
    assert _history_steps(workdir) == [1, 2, 3, 4]  # stopped at the first failed save
    assert sorted(os.listdir(_ckpt_dir(workdir))) == ["2"] and not _leftovers(workdir)
    monkeypatch.undo()
    _resume_completes(workdir, capsys)


def test_a_save_failing_in_the_background_stops_the_run_at_the_next_step(tmp_path, capsys, monkeypatch):
    """The disk fills while Orbax writes step 4's arrays (its background thread fails): the run stops at the next
    step with the same one line, and the half-written step is removed."""
    from orbax.checkpoint._src.serialization import serialization  # noqa: PLC0415

    workdir = str(tmp_path / "run")
    real = serialization.async_serialize_from_host

    async def failing(*args, **kwargs):
        if os.path.isdir(os.path.join(_ckpt_dir(workdir), "2")):
            raise ValueError(f'RESOURCE_EXHAUSTED: Error writing in OCDBT database at local file "{workdir}/stage1/'
                             f'checkpoints/4.orbax-checkpoint-tmp/params": Failed to write 1921024 bytes to file 8: '
                             f'No space left on device [os_error_code=\'28\']')
        return await real(*args, **kwargs)

    monkeypatch.setattr(serialization, "async_serialize_from_host", failing)
    assert train_main(["--workdir", workdir] + ARGS) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"tpo-train: training stopped: cannot write checkpoint step 4 to {_ckpt_dir(workdir)}: "
                           f"No space left on device (") and "MiB free of" in line, line
    assert line.endswith("the committed checkpoints (steps: 2) are intact")
    # the save runs beside the next steps: its failure stops the run once it is known, by the next save at the latest
    assert _history_steps(workdir)[-1] in (4, 5, 6)
    assert sorted(os.listdir(_ckpt_dir(workdir))) == ["2"] and not _leftovers(workdir)
    monkeypatch.undo()
    _resume_completes(workdir, capsys)


def test_a_torn_last_history_line_does_not_block_resume(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert train_main(["--workdir", workdir, "--stop-after", "4"] + ARGS) == 0
    path = os.path.join(workdir, "stage1", "history.jsonl")
    with open(path, "a") as f:
        f.write('{"stage": "stage1", "step": 5, "loss/to')  # killed mid-line (or the disk filled)
    assert _history_steps(workdir) == [1, 2, 3, 4]
    _resume_completes(workdir, capsys)
    # a bad line before the last one is not a torn write: one error naming the file and line
    with open(path) as f:
        lines = f.readlines()
    lines[2] = "{not json\n"
    with open(path, "w") as f:
        f.writelines(lines)
    with pytest.raises(DataError, match=rf"{path}:3: not a JSON record"):
        report.read_jsonl(path)


@pytest.fixture
def tmpfs(tmp_path):
    """`tmpfs(size)`: a tmpfs of `size` ("200M") mounted in tmp_path (root in a container that allows mounts;
    the test is skipped elsewhere), unmounted afterwards."""
    mounted = []

    def mount(size: str):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True,
                           capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            pytest.skip("cannot mount a tmpfs here (needs root in a container that allows mounts)")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def _tiny_hf_checkpoint(directory):
    """A tiny Mistral checkpoint (config.json + model.safetensors) for tpo-convert hf."""
    import fuzz_convert  # noqa: PLC0415  (tests/ is on sys.path under pytest)
    from safetensors.numpy import save_file  # noqa: PLC0415

    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(fuzz_convert.HF_CONFIG, f)
    save_file(fuzz_convert.state_dict(0), os.path.join(directory, "model.safetensors"))
    return str(directory)


def test_tpo_convert_to_a_full_disk_is_one_error_and_leaves_nothing(tmp_path, tmpfs, capsys):
    src = _tiny_hf_checkpoint(tmp_path / "src")
    full = tmpfs("20k")  # the tiny converted checkpoint needs 44 KiB
    out = str(full / "out")
    assert convert_main(["hf", src, out]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"tpo-convert: error: {out}: cannot write the output: No space left on device (") \
        and " MiB free of 0.0 MiB); nothing was left there" in line, line
    assert os.listdir(full) == []
    assert convert_main(["hf", src, str(tmp_path / "ok")]) == 0  # the same conversion with room succeeds


def test_tpo_convert_failing_in_orbax_threads_is_one_error(tmp_path, capsys, monkeypatch):
    """The same without a mount: the array writes fail the way TensorStore reports a full disk."""
    from tpo_jax.checkpoints import convert  # noqa: PLC0415

    def failing(*args, **kwargs):
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "llm.embed_tokens.embedding/c/0/0" in OCDBT database: '
                         'Failed to write 2211840 bytes to file 27: No space left on device [os_error_code=\'28\']')

    monkeypatch.setattr(convert, "write_streaming", failing)
    out = str(tmp_path / "deep" / "out")
    assert convert_main(["hf", _tiny_hf_checkpoint(tmp_path / "src"), out]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"tpo-convert: error: {out}: cannot write the output: No space left on device ("), line
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no output, no temporary directory, no created parent


def test_a_read_only_work_directory_is_one_clear_error(tmpfs, capsys):
    small_tmpfs = tmpfs("200M")
    workdir = str(small_tmpfs / "run")
    assert train_main(["--workdir", workdir, "--stop-after", "4"] + ARGS) == 0
    capsys.readouterr()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True, capture_output=True, timeout=30)
    before = {f: os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(workdir) for f in fs}
    assert train_main(["--workdir", workdir, "--resume"] + ARGS) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"tpo-train: error: {workdir}/") and line.endswith("Read-only file system"), line
    after = {f: os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(workdir) for f in fs}
    assert after == before and not _leftovers(workdir)
    with M.CheckpointManager(_ckpt_dir(workdir), read_only=True) as m:
        assert m.all_steps() == [2, 4] and m.read_json(4)["meta"]["step"] == 4
    with open(os.path.join(workdir, "stage1", "history.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    assert np.isfinite([r["loss/total"] for r in report.read_jsonl(os.path.join(workdir, "stage1",
                                                                                  "history.jsonl"))]).all()
