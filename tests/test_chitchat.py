"""Real data: chitchat conversations converted, previewed, and trained on the bundled model."""

from __future__ import annotations

import json

import pytest

from qfine.cli import main
from qfine.data.chitchat import convert


def test_preview_cli(tmp_path, capsys, bundled_dir):
    rows = [{"conversations": [{"from": "human", "value": "Hi " * (i + 1)}, {"from": "gpt", "value": "Yo"}]}
            for i in range(30)]
    f = tmp_path / "sg.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "preview", str(f), "--max-seq-len", "50"]) == 0
    out = capsys.readouterr().out
    assert "format:   sharegpt (30 rows)" in out
    assert "⟦Yo<|im_end|>⟧" in out  # the loss-bearing part: the reply and EOS, nothing else
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(bundled_dir)
    lengths = [len(tok.encode(tok.apply_chat_template([{"role": "user", "content": r["conversations"][0]["value"]},
                                                       {"role": "assistant", "content": "Yo"}], tokenize=False),
                              add_special_tokens=False)) for r in rows]
    assert 0 < sum(n > 50 for n in lengths) < 30
    over = sum(n > 50 for n in lengths)
    assert f"{over} of 30 rows exceed max_seq_len=50 (truncated)" in out


@pytest.mark.slow
def test_chitchat_eval_loss_falls(tmp_path, bundled_dir):
    n_train, n_eval = convert(tmp_path / "cc", limit=110, eval_every=10)
    assert n_train + n_eval == 110 and n_eval >= 5
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "cc" / "train.jsonl"), "--eval-data", str(tmp_path / "cc" / "eval.jsonl"),
                 "--output-dir", str(run), "--max-steps", "12", "--batch-size", "4", "--max-seq-len", "128",
                 "--learning-rate", "1e-3", "--save-steps", "12", "--eval-steps", "12"]) == 0
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [e["step"] for e in evals] == [0, 12]
    print(f"\n[chitchat] eval loss {evals[0]['eval_loss']:.4f} -> {evals[-1]['eval_loss']:.4f}")
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05
