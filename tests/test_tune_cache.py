"""The decode kernels' tuned settings on disk (:mod:`qfine.fast.tune_cache`): a new process reads what an
earlier one timed, and nothing stale or broken is ever read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qfine.fast import tune_cache

KEY = (torch.device("cpu"), 1, 4096, 14336, torch.bfloat16, 64, True, True)
TIMED = [(1.6e-5, {"KERNEL": "mma", "NT": 1, "WIDE": True, "WARPS": 8, "RW": 1, "TILES": 1, "SPLIT": 1}),
         (1.7e-5, {"KERNEL": "row", "BLOCK_N": 16, "BLOCK_K": 512, "SPLIT": 2, "num_warps": 4, "PRMT": True})]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QFINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QFINE_TUNE_CACHE", raising=False)  # conftest's "off": here the default folder under QFINE_CACHE
    monkeypatch.delenv("QFINE_RETUNE", raising=False)
    monkeypatch.setattr(tune_cache, "_LOADED", {})
    return tmp_path / "cache" / "tuned"


def _in_process(code: str) -> str:
    """Run ``code`` in a new Python process with this one's environment and path; its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_new_process_reads_what_an_earlier_one_stored(cache):
    """One process stores a shape's timings; a second, started afresh, reads the same settings in the same
    order (dtypes and shapes as keys, the device named by the fingerprint); another shape is not there."""
    _in_process(f"""
        import torch
        from torch import device
        from qfine.fast import tune_cache
        tune_cache.remember({KEY!r}, torch.device("cpu"), {TIMED!r})
        tune_cache.remember(("group", torch.device("cpu"), 1, torch.Size([4096, 1024, 1024])), torch.device("cpu"),
                            [(1e-5, {{"SEPARATE": True}})])
    """)
    out = _in_process(f"""
        import json, torch
        from torch import device
        from qfine.fast import tune_cache
        cpu = torch.device("cpu")
        print(json.dumps([tune_cache.remembered({KEY!r}, cpu),
                          tune_cache.remembered(("group", cpu, 1, (4096, 1024, 1024)), cpu),
                          tune_cache.remembered({KEY[:3] + (4096,) + KEY[4:]!r}, cpu)]))
    """)
    same, group, other = json.loads(out)
    assert [tuple(t) for t in same] == [(s, cfg) for s, cfg in TIMED]
    assert group == [[1e-5, {"SEPARATE": True}]]
    assert other is None
    assert len(list(cache.glob("*.json"))) == 1 and not list(cache.glob("*.tmp"))


def test_a_switch_or_a_kernel_source_that_differs_names_another_file(cache, monkeypatch, tmp_path):
    """The fingerprint changes with QFINE_MMA_FETCH, QFINE_PDL and with one byte of a kernel's source; what
    was stored under the old one is not read under the new."""
    cpu = torch.device("cpu")
    tune_cache.remember(KEY, cpu, TIMED)
    first = tune_cache.fingerprint(cpu)
    monkeypatch.setenv("QFINE_MMA_FETCH", "L2B=256")
    assert tune_cache.fingerprint(cpu) != first and tune_cache.remembered(KEY, cpu) is None
    monkeypatch.delenv("QFINE_MMA_FETCH")
    monkeypatch.setenv("QFINE_PDL", "1")
    assert tune_cache.fingerprint(cpu) != first and tune_cache.remembered(KEY, cpu) is None
    monkeypatch.delenv("QFINE_PDL")
    assert tune_cache.fingerprint(cpu) == first and tune_cache.remembered(KEY, cpu) is not None

    import importlib.resources

    copy = tmp_path / "fast"
    copy.mkdir()
    real = importlib.resources.files("qfine.fast")
    for path in real.iterdir():
        if path.name.endswith((".py", ".cu")):
            (copy / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(importlib.resources, "files", lambda package: copy)
    assert tune_cache.fingerprint(cpu) == first
    source = (copy / "mma4.cu").read_bytes()
    (copy / "mma4.cu").write_bytes(source + b" ")
    assert tune_cache.fingerprint(cpu) != first and tune_cache.remembered(KEY, cpu) is None


def test_retune_and_a_broken_file_are_never_read(cache, monkeypatch):
    """QFINE_RETUNE=1 reads nothing; a file cut short or holding other JSON reads as empty, and the next
    store replaces it with a whole one; a setting that is not JSON leaves the file as it was."""
    cpu = torch.device("cpu")
    tune_cache.remember(KEY, cpu, TIMED)
    monkeypatch.setenv("QFINE_RETUNE", "1")
    assert tune_cache.remembered(KEY, cpu) is None
    monkeypatch.delenv("QFINE_RETUNE")
    (path,) = cache.glob("*.json")
    for broken in (path.read_text()[:40], '{"entries": [1, 2]}', '{"entries": {"[1]": [[1.0, 2]]}}'):
        path.write_text(broken)
        monkeypatch.setattr(tune_cache, "_LOADED", {})
        key = (1,) if "[1]" in broken else KEY
        assert tune_cache.remembered(key, cpu) is None, broken
    tune_cache.remember(KEY, cpu, TIMED[:1])
    assert json.loads(path.read_text()) == {"entries": {tune_cache.key_text(KEY): [list(TIMED[0])]}}
    tune_cache.remember(("x",), cpu, [(1.0, {"bad": object()})])
    assert json.loads(path.read_text()) == {"entries": {tune_cache.key_text(KEY): [list(TIMED[0])]}}
    assert not list(cache.glob("*.tmp"))


def test_off_neither_reads_nor_stores_and_a_folder_of_its_own_is_used(cache, monkeypatch, tmp_path):
    """QFINE_TUNE_CACHE=off (the tests' setting) reads nothing and leaves the stored file as it was; a folder
    named there is the only one read and written."""
    cpu = torch.device("cpu")
    tune_cache.remember(KEY, cpu, TIMED)
    (path,) = cache.glob("*.json")
    stored = path.read_text()
    monkeypatch.setenv("QFINE_TUNE_CACHE", "off")
    monkeypatch.setattr(tune_cache, "_LOADED", {})
    assert tune_cache.remembered(KEY, cpu) is None
    tune_cache.remember(("other",), cpu, TIMED)
    assert path.read_text() == stored and list(cache.iterdir()) == [path]
    monkeypatch.setenv("QFINE_TUNE_CACHE", str(tmp_path / "mine"))
    assert tune_cache.remembered(KEY, cpu) is None
    tune_cache.remember(KEY, cpu, TIMED[:1])
    assert [p.name for p in (tmp_path / "mine").iterdir()] == [path.name]
    assert tune_cache.remembered(KEY, cpu) == [TIMED[0]] and path.read_text() == stored


def test_a_tuners_table_is_filled_from_this_process_then_from_the_file(cache, monkeypatch):
    """What the tuners call: ``measured`` keeps timings in the tuner's table and the file; ``known`` answers
    from the table, and for a table of a new process from the file (then holding it in the table)."""
    cpu = torch.device("cpu")
    table: dict = {}
    assert tune_cache.known(table, KEY, cpu) is None and table == {}
    assert tune_cache.measured(table, KEY, cpu, TIMED) == TIMED and table == {KEY: TIMED}
    assert tune_cache.known(table, KEY, cpu) is TIMED  # this process's own list, not a reread
    monkeypatch.setattr(tune_cache, "_LOADED", {})  # as a new process
    fresh: dict = {}
    assert tune_cache.known(fresh, KEY, cpu) == TIMED and fresh == {KEY: TIMED}


def test_two_processes_storing_other_shapes_keep_both(cache):
    """Each store merges with the file as another process left it, keeping the fastest KEEP settings."""
    for n in (1024, 4096):
        _in_process(f"""
            import torch
            from qfine.fast import tune_cache
            timed = [(i * 1e-6, {{"SPLIT": i}}) for i in range(1, 12)]
            tune_cache.remember(("w", {n}), torch.device("cpu"), timed)
        """)
    cpu = torch.device("cpu")
    for n in (1024, 4096):
        got = tune_cache.remembered(("w", n), cpu)
        assert [cfg["SPLIT"] for _, cfg in got] == list(range(1, tune_cache.KEEP + 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_a_new_process_decodes_with_the_stored_settings_without_timing(tmp_path):
    """Through the 4-bit tuner (an 8B q shape, NF4, one row): a first process times and stores; a second,
    whose timing function raises, gets the same setting from the file and the same output bits."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "QFINE_TUNE_CACHE": str(tmp_path / "tuned")}
    env.pop("QFINE_RETUNE", None)
    code = textwrap.dedent("""
        import sys, torch, bitsandbytes as bnb
        from qfine.fast import gemv_kernel as G
        if sys.argv[1] == "second":
            def refuse(*a, **k):
                raise AssertionError("timed again")
            G.graph_seconds = refuse
        torch.manual_seed(0)
        w = bnb.nn.Params4bit(torch.randn(4096, 4096, dtype=torch.bfloat16) * 0.02, requires_grad=False,
                              quant_type="nf4", compress_statistics=True, blocksize=64).cuda()
        x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
        y = G.matmul_4bit(x, w)
        (key,) = [k for k in G.TUNED if k[2:4] == (4096, 4096)]
        torch.save({"y": y.cpu(), "cfg": G.TUNED[key][0][1]}, sys.argv[2])
    """)
    outs = []
    for which in ("first", "second"):
        out = tmp_path / f"{which}.pt"
        done = subprocess.run([sys.executable, "-c", code, which, str(out)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        outs.append(torch.load(out))
    assert outs[0]["cfg"] == outs[1]["cfg"]
    assert torch.equal(outs[0]["y"], outs[1]["y"])
