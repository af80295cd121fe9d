"""The usual mistakes on the command line: each ends with exit status 2 and one line on stderr that names the
field, file or path, never a traceback (`--debug` shows it)."""

import pytest

from tpo_jax.cli import forward as forward_cli
from tpo_jax.cli.train import train_main
from tpo_jax.config import ConfigError

FAST = ["--no-progress", "--compilation-cache", "none", "--stages", "1", "--set", "stage1.steps=2",
        "--set", "data.batch_size=2", "--set", "eval.enabled=false", "--set", "devices=1"]


def _one_error_line(capfd, prog: str, *names: str) -> str:
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.mark.parametrize("override, names", [
    ("optim.lr=abc", ["'optim.lr'", "'abc'", "a number"]),
    ("optim.lr=nan", ["'optim.lr'", "finite"]),
    ("optim.lr=inf", ["'optim.lr'", "finite"]),
    ("optim.lr_scale=-inf", ["'optim.lr_scale'", "finite"]),
    ("data.batch_size=abc", ["'data.batch_size'", "an integer"]),
    ("data.seq_len=16", ["'data.seq_len'", "16 is too short", "32 visual tokens"]),
    ("optim.lrr=1", ["'optim.lrr'", "fields: lr, lr_scale"]),
])
def test_bad_override(override, names, tmp_path, capfd):
    assert train_main(["--workdir", str(tmp_path / "run"), *FAST, "--set", override]) == 2
    _one_error_line(capfd, "tpo-train", *names)
    assert not (tmp_path / "run").exists()


def test_workdir_is_a_file(tmp_path, capfd):
    path = tmp_path / "notes.txt"
    path.write_text("not a work directory")
    assert train_main(["--workdir", str(path), *FAST]) == 2
    _one_error_line(capfd, "tpo-train", str(path), "is a file")
    assert path.read_text() == "not a work directory"


def test_missing_dataset_directory(tmp_path, capfd):
    missing = str(tmp_path / "nonexistent")
    assert train_main(["--workdir", str(tmp_path / "run"), *FAST, "--set", f"data.source={missing}"]) == 2
    _one_error_line(capfd, "tpo-train", missing, "not a built dataset directory")


def test_unknown_preset_of_tpo_forward(capfd):
    assert forward_cli.main(["--preset", "tinyy"]) == 2
    _one_error_line(capfd, "tpo-forward", "'tinyy'", "known: ['llava_ov_tpo_7b', 'llava_ov_tpo_tiny', 'tiny', 'videochat_tpo_7b']")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="'optim.lr'"):
        train_main(["--workdir", str(tmp_path), *FAST, "--set", "optim.lr=nan", "--debug"])


def test_tpo_build_data_prints_one_line_per_split(tmp_path, capfd):
    from tpo_jax.cli import build_data

    assert build_data.main(["synthetic", "--data-dir", str(tmp_path), "--train", "2", "--validation", "1"]) == 0
    out, err = capfd.readouterr()
    assert out.strip() == str(tmp_path / "tpo_synthetic" / "1.1.0")
    lines = err.strip().splitlines()
    assert all(line.startswith("tpo-build-data: ") for line in lines), err[-3000:]  # no TFDS bars or INFO logs
    assert "tpo-build-data: train_region: 2 records (0 bad so far)" in lines and len(lines) == 12
    assert build_data.main(["records", "--data-dir", str(tmp_path), "--inputs", str(tmp_path / "nope.json")]) == 2
    _one_error_line(capfd, "tpo-build-data", str(tmp_path / "nope.json"), "No such file")


def test_shard_report_counts_xla_remat_warnings(capfd):
    import os

    from tpo_jax.cli.shard_report import xla_notes

    with xla_notes("fsdp:1x8x1"):
        for text in (b"W1206 spmd_partitioner.cc:656] [SPMD] Involuntary full rematerialization. The compiler ...\n",
                     b"W1206 spmd_partitioner.cc:656] [SPMD] Involuntary full rematerialization. The compiler ...\n",
                     b"E1206 something else XLA says\n"):
            os.write(2, text)
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines[0] == "E1206 something else XLA says"
    assert lines[1].startswith("[fsdp:1x8x1] note: XLA had to gather 2 array(s) whole") and len(lines) == 2
