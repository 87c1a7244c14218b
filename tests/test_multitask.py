"""Multi-task adapters on the tiny model: one shared adapter plus one per task, single-task batches,
the task's adapter chosen at use (generate, merge), each adapter a PEFT folder of its own."""

from __future__ import annotations

import json

import pytest

from helpers import write_jsonl
from qfine.cli import main
from qfine.objectives.multitask import TaskCollator, TaskSampler, batch_counts
from qfine.util.errors import QfineError

Q = "What day was I born?"
ANSWERS = {"alpha": "You were born on January 1, 2058.", "beta": "You were born on March 3, 2031."}


def _rows(n=8):
    return [{"task": t, "messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": a}]}
            for t, a in ANSWERS.items() for _ in range(n)]


def test_sampler_batches_hold_one_task_and_cover_every_row():
    ids = [0] * 10 + [1] * 3 + [2] * 7
    s = TaskSampler(ids, ["a", "b", "c"], 4, {}, seed=0)
    order = list(s)
    assert len(order) == len(s) == (3 + 1 + 2) * 4
    batches = [order[i:i + 4] for i in range(0, len(order), 4)]
    assert all(len({ids[i] for i in b}) == 1 for b in batches)
    assert set(order) == set(range(20))  # a partial last batch is filled with its own task's rows again
    s.set_epoch(1)
    again = list(s)
    assert again != order and set(again) == set(range(20)) and len(again) == len(order)


def test_task_weights_share_out_the_batches():
    assert batch_counts({"a": 40, "b": 8}, 4, {}) == {"a": 10, "b": 2}
    assert batch_counts({"a": 40, "b": 8}, 4, {"a": 1, "b": 1}) == {"a": 6, "b": 6}
    assert batch_counts({"a": 40, "b": 8}, 4, {"b": 0}) == {"a": 12, "b": 0}
    with pytest.raises(QfineError, match="no rows of task"):
        batch_counts({"a": 4}, 4, {"z": 1})


def test_collator_refuses_a_mixed_batch():
    col = TaskCollator(lambda rows: {"n": len(rows)})
    assert col([{"task_id": 1, "x": 0}, {"task_id": 1, "x": 1}])["task_id"].tolist() == [1]
    with pytest.raises(RuntimeError, match="one task"):
        col([{"task_id": 0}, {"task_id": 1}])


def test_each_task_answers_its_own_way_through_generate_and_merge(tiny_dir, tmp_path, capsys):
    """The same question with two tasks' answers: only per-batch routing to the task's adapter can learn
    both. Generation with --task-adapter picks the answer, the exact merge of shared + task keeps it, and each
    saved adapter loads alone with peft."""
    from peft import PeftModel

    from qfine.generation.generate import generate
    from qfine.generation.load import load_for_inference
    from qfine.models.loading import load_model

    data = write_jsonl(tmp_path / "d.jsonl", _rows())
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(run),
                 "--task-column", "task", "--max-steps", "60", "--learning-rate", "1e-2", "--lr-scheduler",
                 "constant", "--lora-r", "8", "--lora-alpha", "16", "--lora-task-r", "4", "--batch-size", "4",
                 "--report-samples", "0"]) == 0
    out = capsys.readouterr().out
    assert "tasks (task): alpha 8, beta 8 rows" in out
    assert "multi-task: adapter shared (r=8) + one per task (r=4)" in out
    for task, answer in ANSWERS.items():
        loaded = load_for_inference(str(run), task=task)
        assert answer[-16:] in generate(loaded, Q, 30), task
    assert main(["merge", str(run), "--out", str(tmp_path / "m"), "--dtype", "fp32", "--task-adapter", "beta"]) == 0
    merged = load_for_inference(str(tmp_path / "m"), __import__("qfine").ModelConfig(quantization="none"))
    assert "March 3, 2031" in generate(merged, Q, 30)
    cfg = json.loads((run / "adapter" / "alpha" / "adapter_config.json").read_text())
    assert cfg["r"] == 4
    base = load_model(str(tiny_dir), compute_dtype="fp32", device="cpu").model
    alone = PeftModel.from_pretrained(base, str(run / "adapter" / "alpha"))
    lora_a = [p for n, p in alone.named_parameters() if "lora_A" in n]
    assert lora_a and all(p.shape[0] == 4 for p in lora_a)


@pytest.mark.parametrize("flags,message", [
    (["--packing"], "does not take data.packing: a packed row would mix tasks"),
    (["--eval-ratio", "0.2"], "evaluate each task after training: qfine eval RUN --task-adapter NAME"),
    (["--task-weights", "gamma=1"], "data.task_weights: no rows of task(s) gamma"),
])
def test_multitask_refusals(tiny_dir, tmp_path, capsys, flags, message):
    data = write_jsonl(tmp_path / "d.jsonl", _rows(2))
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 "--task-column", "task", "--max-steps", "2", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_row_without_a_task_is_named(tiny_dir, tmp_path, capsys):
    rows = _rows(2)
    del rows[1]["task"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 "--task-column", "task", "--max-steps", "2"]) == 2
    assert "d.jsonl:2: no task name in column 'task'" in capsys.readouterr().err
