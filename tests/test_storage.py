"""Full disks, read-only folders and damaged files get one clear line, and nothing good is lost.

The full and read-only file systems are real: a tmpfs of a chosen size mounted in a private mount
namespace (``unshare -rm``: no root needed where user namespaces are allowed), so every writer —
Python's, torch's zip writer, safetensors' Rust one — meets the kernel's ENOSPC and EROFS itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import FACT, tiny_config, write_jsonl
from qfine.cli import main
from qfine.training import train
from qfine.training.resume import SEAL, checkpoints, why_incomplete


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m none $d"],
                           capture_output=True)
    return probe.returncode == 0


small_fs = pytest.mark.skipif(not _namespaces_work(), reason="no private mount namespace here (unshare -rm)")


def _in_small_fs(script: str, size: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the shell ``script`` with ``$FS`` a fresh tmpfs of ``size`` that only it sees."""
    full = f'set -u\nFS=$(mktemp -d)\nmount -t tmpfs -o size={size} none "$FS" || exit 99\n{script}'
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", full], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode != 99, done.stderr
    return done


def _qfine() -> str:
    return f"{sys.executable} -m qfine"


def _rows(path: Path, n: int = 32) -> Path:
    return write_jsonl(path, [{"messages": [{"role": "user", "content": f"{FACT[0]['content']} ({i})"},
                                            FACT[1]]} for i in range(n)])


def _train_flags(tiny_dir, data, steps: int) -> str:
    return (f"--model {tiny_dir} --data {data} --max-steps {steps} --save-steps 6 --batch-size 4 "
            "--learning-rate 5e-3 --lora-r 8 --lora-alpha 16 --report-samples 0")


@pytest.mark.slow  # a 60-step run and its continuation: about a minute on 2 cores
@small_fs
def test_a_disk_that_fills_mid_run_keeps_the_last_checkpoint_and_the_run_continues_once_freed(tiny_dir, tmp_path):
    """Another process fills the disk once checkpoint-6 is sealed: the run stops with one line naming
    the folder, the free bytes and what a checkpoint needs, exit 2; checkpoint-6 is whole, no partial
    one is left; once space is freed, --resume finishes the run."""
    data = _rows(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    script = f"""
{_qfine()} train {_train_flags(tiny_dir, data, 60)} --output-dir $FS/run > {out}/first.out 2> {out}/first.err &
pid=$!
while [ ! -f $FS/run/checkpoints/checkpoint-6/{SEAL} ] && kill -0 $pid 2>/dev/null; do sleep 0.005; done
cat /dev/zero > $FS/filler 2>/dev/null
wait $pid; echo $? > {out}/first.rc
cp -r $FS/run {out}/after-failure
rm $FS/filler
{_qfine()} train $FS/run/config.yaml --resume > {out}/second.out 2> {out}/second.err; echo $? > {out}/second.rc
cp -r $FS/run {out}/final
"""
    _in_small_fs(script, "80m")
    err = (out / "first.err").read_text()
    assert (out / "first.rc").read_text().strip() == "2", err[-3000:]
    line = [s for s in err.splitlines() if s.startswith("qfine: error:")]
    assert len(line) == 1 and "Traceback" not in err, err[-3000:]
    # the free bytes are measured after the failed write; a writer's cleanup may have freed a page or two
    assert re.search(r"no space left on the device \([0-9.]+ (bytes|KiB) free there, about [0-9.]+ MiB needed\)",
                     line[0]), line[0]
    assert "the last whole checkpoint is" in line[0] and "--resume" in line[0]
    after = out / "after-failure"
    kept = checkpoints(after)
    assert kept and all(why_incomplete(c) is None for c in kept)  # no partial checkpoint left behind
    assert "checkpoint-6" in [c.name for c in kept]
    assert (out / "second.rc").read_text().strip() == "0", (out / "second.err").read_text()[-3000:]
    final = out / "final"
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    steps = [json.loads(s)["step"] for s in (final / "metrics.jsonl").read_text().splitlines() if '"loss"' in s]
    assert steps == list(range(1, 61))


@small_fs
def test_training_and_plan_refuse_a_disk_too_small_for_the_checkpoints(tiny_dir, tmp_path):
    data = _rows(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    script = f"""
{_qfine()} train {_train_flags(tiny_dir, data, 12)} --output-dir $FS/run 2> {out}/train.err; echo $? > {out}/train.rc
{_qfine()} plan --model {tiny_dir} --gpu-memory 24GiB --output-dir $FS/run 2> {out}/plan.err; echo $? > {out}/plan.rc
ls -A $FS > {out}/left
"""
    _in_small_fs(script, "20m")
    for cmd in ("train", "plan"):
        err = (out / f"{cmd}.err").read_text()
        assert (out / f"{cmd}.rc").read_text().strip() == "2", err[-3000:]
        assert "free on its file system, but the run's checkpoints and adapter need about" in err, err[-2000:]
        assert "Traceback" not in err
    assert (out / "left").read_text().strip() == ""  # nothing was written


@pytest.fixture(scope="module")
def finished_run(tiny_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    return train(tiny_config(tiny_dir, _rows(tmp / "d.jsonl", 16), tmp / "run", max_steps=6, save_steps=6,
                             report_samples=0))


@small_fs
def test_merge_and_export_into_a_full_or_read_only_disk_leave_nothing(finished_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = f"""
{_qfine()} merge {finished_run} --out $FS/merged --dtype fp32 2> {out}/merge.err; echo $? > {out}/merge.rc
{_qfine()} export {finished_run} --quant q8_0 --out $FS/m.gguf 2> {out}/export.err; echo $? > {out}/export.rc
ls -A $FS > {out}/left-full
mount -o remount,ro "$FS"
{_qfine()} merge {finished_run} --out $FS/merged 2> {out}/ro.err; echo $? > {out}/ro.rc
"""
    _in_small_fs(script, "2m")
    for cmd in ("merge", "export"):
        err = (out / f"{cmd}.err").read_text()
        assert (out / f"{cmd}.rc").read_text().strip() == "2", err[-3000:]
        assert f"qfine: error: qfine {cmd}: cannot write" in err and "no space left on the device" in err, err[-2000:]
        assert "nothing was left at" in err and "Traceback" not in err
    assert (out / "left-full").read_text().strip() == ""
    err = (out / "ro.err").read_text()
    assert (out / "ro.rc").read_text().strip() == "2" and "the file system is read-only" in err, err[-2000:]


# ---- damaged inputs -----------------------------------------------------------------------------

def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _one_line(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_an_adapter_with_a_truncated_safetensors_file_is_named(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _cut(run / "adapter" / "adapter_model.safetensors")
    err = _one_line(["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    assert f"{run / 'adapter' / 'adapter_model.safetensors'} is damaged: it ends early" in err


def test_a_model_folder_that_ends_early_or_a_config_that_is_not_json_is_named(tiny_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    weights = next(model.glob("*.safetensors"))
    _cut(weights, 0.9)
    err = _one_line(["generate", str(model), "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    assert f"{weights} is damaged: it ends early" in err
    shutil.copy(next(Path(tiny_dir).glob("*.safetensors")), weights)
    (model / "config.json").write_text('{"model_type": "llama",\n "hidden_size": 64,,}')
    err = _one_line(["generate", str(model), "--prompt", "hi"], capsys)
    assert f"{model / 'config.json'} is damaged: not valid JSON at line 2" in err


def test_a_gguf_that_ends_early_is_named(tmp_path, capsys):
    """Cut at three places: inside the tensor data, inside the tensor table, inside the metadata."""
    import numpy as np
    from gguf import GGUFWriter

    whole = tmp_path / "whole.gguf"
    writer = GGUFWriter(str(whole), "llama")
    writer.add_name("cut")
    for i in range(4):
        writer.add_tensor(f"blk.{i}.ffn_up.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = whole.read_bytes()
    for keep in (len(data) - 5000, 200, 40):
        gguf = tmp_path / f"cut-{keep}.gguf"
        gguf.write_bytes(data[:keep])
        err = _one_line(["generate", str(gguf), "--prompt", "hi"], capsys)
        assert f"{gguf} is damaged:" in err and "ends early" in err, err


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_a_checkpoint_with_a_damaged_optimizer_state_is_named_on_resume(finished_run, tmp_path, capsys, how):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "adapter")
    ckpt = run / "checkpoints" / "checkpoint-6"
    state = ckpt / "optimizer.pt"
    data = bytearray(state.read_bytes())
    if how == "flipped":  # same size (the seal's record still matches), one byte of a tensor changed
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    state.write_bytes(bytes(data))
    if how == "truncated":  # a truncation the seal would catch; refresh it so the archive check is what fails
        seal = json.loads((ckpt / SEAL).read_text())
        seal["files"]["optimizer.pt"] = len(data)
        (ckpt / SEAL).write_text(json.dumps(seal))
    err = _one_line(["train", str(run / "config.yaml"), "--resume", "--output-dir", str(run)], capsys)
    assert f"{state} is damaged" in err and f"Remove {ckpt} to resume from the checkpoint before it" in err


def test_write_failure_reads_the_errno_each_writer_reports(tmp_path):
    from safetensors.torch import save_file  # noqa: F401 - the message format below is safetensors'

    from qfine.util.files import write_failure

    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "no space left on the device" in str(write_failure(rust, tmp_path, "saving"))
    ro = OSError(30, "Read-only file system")
    assert "cannot write" in str(write_failure(ro, tmp_path, "saving")) and "read-only" in str(
        write_failure(ro, tmp_path, "saving"))
    assert write_failure(ValueError("a bug, with room on the disk"), tmp_path, "saving") is None
    assert write_failure(torch.cuda.OutOfMemoryError("CUDA out of memory"), tmp_path, "saving") is None
