"""Data: readers, format detection, templates, loss masks (decoded exactly), bad rows."""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoTokenizer

from helpers import write_jsonl
from qfine.config import DataConfig
from qfine.data import build_dataset, read_rows, to_messages
from qfine.data.pipeline import IGNORE, build_datasets, encode_messages, encode_row
from qfine.data.templates import set_template
from qfine.util.errors import QfineError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Teal."}]


@pytest.fixture(scope="module")
def tok(bundled_dir):
    return AutoTokenizer.from_pretrained(bundled_dir)


def _label_text(tok, enc):
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE])


@pytest.mark.parametrize("template", ["tokenizer", "chatml", "llama2", "alpaca", "qa"])
def test_labels_decode_to_assistant_texts_plus_eos(tok, template):
    t = AutoTokenizer.from_pretrained(tok.name_or_path)
    set_template(t, template)
    enc = encode_messages(t, CHAT, "completion")
    assert _label_text(t, enc) == "Hello! How can I help?" + t.eos_token + "Teal." + t.eos_token
    last = encode_messages(t, CHAT, "last_turn")
    assert _label_text(t, last) == "Teal." + t.eos_token
    full = encode_messages(t, CHAT, "all")
    assert full.labels == full.input_ids
    # single turn: the prompt tokens are exactly what inference feeds the model, then reply + EOS
    one = encode_messages(t, CHAT[:3], "completion")
    prompt = t.encode(t.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)
    reply = t.encode("Hello! How can I help?", add_special_tokens=False) + [t.eos_token_id]
    assert one.input_ids[:len(prompt) + len(reply)] == prompt + reply
    assert one.labels[:len(prompt)] == [IGNORE] * len(prompt)


def test_builtin_layouts_render_as_documented(tok):
    t = AutoTokenizer.from_pretrained(tok.name_or_path)
    msgs = [{"role": "user", "content": "Q", "question": "Why?", "context": "Because."},
            {"role": "assistant", "content": "A"}]
    set_template(t, "qa")
    assert t.apply_chat_template(msgs, tokenize=False) == \
        f"### CONTEXT\nBecause.\n\n### QUESTION\nWhy?\n\n### ANSWER\nA{t.eos_token}\n\n"
    set_template(t, "llama2")
    sys_msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    assert t.apply_chat_template(sys_msgs, tokenize=False) == \
        f"{t.bos_token}[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A{t.eos_token}"
    set_template(t, "alpaca")
    alp = to_messages({"instruction": "Add", "input": "2+2", "output": "4"}, "r")
    assert t.apply_chat_template(alp, tokenize=False).endswith("### Instruction:\nAdd\n\n### Input:\n2+2\n\n### Response:\n4"
                                                                + t.eos_token + "\n\n")


@pytest.mark.parametrize("row, fmt, user, reply", [
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}, "messages", "u", "a"),
    ({"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}, "sharegpt", "u", "a"),
    ({"instruction": "do", "input": "this", "output": "done"}, "alpaca", "do\n\nthis", "done"),
    ({"instruction": "do", "context": "ctx", "response": "ok"}, "dolly", "do\n\nctx", "ok"),
    ({"question": "why", "context": "c", "answer": "because"}, "qa", "c\n\nwhy", "because"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion", "p", "c"),
])
def test_formats_detected_and_converted(row, fmt, user, reply):
    from qfine.data.formats import detect_format

    assert detect_format(row, "r") == fmt
    msgs = to_messages(row, "r")
    assert (msgs[-2]["role"], msgs[-2]["content"]) == ("user", user)
    assert (msgs[-1]["role"], msgs[-1]["content"]) == ("assistant", reply)


def test_column_mapping_and_text(tok):
    cfg = DataConfig(columns={"prompt": "q", "completion": "a"})
    enc = encode_row({"q": "2+2?", "a": "4"}, tok, cfg)
    assert _label_text(tok, enc) == "4" + tok.eos_token
    enc = encode_row({"text": "plain words"}, tok, DataConfig())
    assert tok.decode(enc.input_ids) == "plain words" + tok.eos_token and enc.labels == enc.input_ids


def test_readers_all_kinds_agree(tmp_path, tok):
    import pandas as pd
    from datasets import Dataset

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", rows[:3])
    write_jsonl(tmp_path / "b.jsonl", rows[3:])
    (tmp_path / "d.json").write_text(json.dumps({"train": rows, "test": rows[:1]}))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for spec in [tmp_path / "*.jsonl", tmp_path / "d.json", tmp_path / "d.csv", tmp_path / "d.parquet", tmp_path / "saved"]:
        got = [r for _, r in read_rows(spec)]
        assert got == rows, spec
    assert [r for _, r in read_rows(tmp_path / "d.json", split="test")] == rows[:1]
    where = [w for w, _ in read_rows(tmp_path / "d.csv")]
    assert where[0] == f"{tmp_path / 'd.csv'}:2"  # the header is line 1


def test_eval_ratio_split(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)])
    train, ev, stats = build_datasets(tok, DataConfig(path=str(tmp_path / "d.jsonl"), eval_ratio=0.25))
    assert (len(train), len(ev), stats.rows) == (15, 5, 20)


@pytest.mark.parametrize("content, message", [
    (b'{"messages": [{"content": "x"}]}\n', "messages[0] needs 'role' and 'content'"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}\n',
     "messages[1] is an empty assistant turn"),
    (b'{"messages": [{"role": "user", "content": "q"}]}\n', "no assistant turn"),
    (b'{"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "x"}]}\n',
     "content must be a string, got list"),
    (b'{"prompt": "ok", "completion": "\xff\xfe"}\n', "not valid UTF-8"),
    (b'{"prompt": "ok", "completion": 5}\n', "'completion' must be a string, got int"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}\n', "role is 'robot'"),
])
def test_bad_rows_named_by_file_and_line(tmp_path, tok, content, message):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"prompt": "fine", "completion": "row"}\n' + content)
    with pytest.raises(QfineError, match=re.escape(message)) as e:
        build_dataset(f, tok, DataConfig())
    assert f"{f}:2" in str(e.value)


def test_skip_bad_rows_counts_them(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"prompt": "a", "completion": "b"}\n{oops\n{"text": 3}\n{"prompt": "c", "completion": "d"}\n')
    ds, stats = build_dataset(f, tok, DataConfig(on_bad_rows="skip"))
    assert (len(ds), stats.rows, stats.skipped) == (2, 2, 2)
    assert f"{f}:2" in stats.first_skip
    f.write_bytes(b"{oops\n")
    with pytest.raises(QfineError, match=r"no usable rows \(1 bad rows skipped"):
        build_dataset(f, tok, DataConfig(on_bad_rows="skip"))


def test_too_long_truncate_or_drop(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "word " * 80, "completion": "yes"},
                                           {"prompt": "short", "completion": "ok"}])
    ds, stats = build_dataset(f, tok, DataConfig(max_seq_len=48))
    # the long row keeps only prompt tokens after truncation, so nothing is left to train on: dropped
    assert (len(ds), stats.truncated, stats.dropped) == (1, 1, 1)
    ds, stats = build_dataset(f, tok, DataConfig(max_seq_len=48, too_long="drop"))
    assert (len(ds), stats.dropped) == (1, 1)
    assert max(stats.lengths) > 80


def test_rows_left_without_a_token_to_predict_stop_with_a_message(tmp_path):
    """A tokenizer that makes every row a single token (here: nothing but the EOS qfine appends)
    would train with loss 0.0 forever; no such row is used, and none left is an error naming why."""
    class OneTokenTokenizer:
        eos_token, eos_token_id, chat_template = "</s>", 2, None

        def encode(self, text, add_special_tokens=False):
            return []

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}, {"text": "world"}])
    with pytest.raises(QfineError, match=r"no usable rows \(2 with no token to predict"):
        build_dataset(data, OneTokenTokenizer(), DataConfig(path=str(data)))
