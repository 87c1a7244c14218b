"""`qfine --help` and `--version` answer without importing torch or transformers (bench/cli_startup.py
measures the time); a missing model path is named before they are imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from qfine.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("heavy:", sorted(m for m in ("torch", "transformers", "peft", "datasets", "trl") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["--version"], ["chat", "--help"],
                                  ["generate", "runs/no-such-run", "--prompt", "hi"]])
def test_help_version_and_a_missing_path_import_no_heavy_library(argv, tmp_path):
    (tmp_path / "runs").mkdir()
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    assert "heavy: []" in out.stdout, out.stdout + out.stderr
    if argv[0] == "generate":
        assert "model path does not exist: runs/no-such-run" in out.stderr


def test_version_names_qfine_and_the_libraries_it_runs_on(capsys):
    from qfine import __version__
    from qfine.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    text = capsys.readouterr().out
    assert text.startswith(f"qfine {__version__} (torch ")
    assert "transformers " in text and "peft " in text


def test_help_shows_each_fields_default(capsys):
    from qfine.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Peak learning rate. (default: 0.0002)" in text
    assert "LoRA rank. (default: 16)" in text
    assert "(default: all-linear)" in text
