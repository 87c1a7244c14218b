"""Atomic outputs: whole or absent, and as readable as a plain write would make them."""

from __future__ import annotations

import os
import stat

import pytest

from qfine.fsutil import atomic_dir, atomic_write_text


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
