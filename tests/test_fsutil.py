"""Atomic outputs: whole or absent, and as readable as a plain write would make them."""

from __future__ import annotations

import os
import stat

import pytest

from qfine.util.files import atomic_dir, atomic_write_text


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_get_the_modes_of_a_plain_write(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        with atomic_dir(tmp_path / "adapter") as tmp:
            (tmp / "w.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "config.yaml").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == dir_mode
    assert (tmp_path / "adapter" / "w.bin").read_bytes() == b"x"


def test_a_failed_write_leaves_the_previous_output(tmp_path):
    atomic_write_text(tmp_path / "f.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed")
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.tmp-*"))
    assert (tmp_path / "f.txt").read_text() == "old"


def test_weight_files_of_a_run_a_checkpoint_and_a_merge_are_readable_by_others(tmp_path, tiny_dir):
    """safetensors writes through a private temporary file (0600): every file qfine writes must still
    get the mode a plain write gives (0644 under umask 022), so a serving user can read it."""
    from helpers import FACT, write_jsonl
    from qfine.cli import main

    data = write_jsonl(tmp_path / "fact.jsonl", [{"messages": FACT}] * 4)
    old = os.umask(0o022)
    try:
        assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                     "--max-steps", "2", "--save-steps", "2", "--batch-size", "2", "--report-samples", "0"]) == 0
        assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    weights = [tmp_path / "run" / "adapter" / "adapter_model.safetensors",
               tmp_path / "run" / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors",
               *sorted((tmp_path / "merged").glob("*.safetensors"))]
    assert len(weights) >= 3
    for path in weights:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
