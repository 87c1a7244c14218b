"""Bad input: one clear message, exit status 2, no traceback, nothing overwritten."""

from __future__ import annotations

import shutil

import pytest

from helpers import write_jsonl
from qfine.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _train(tiny_dir, data, out, *extra):
    return ("train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(out),
            "--max-steps", "1", "--batch-size", "1", *extra)


def _assert_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith("qfine: error: ")
    assert len(err.strip().splitlines()) == 1
    for n in needles:
        assert n in err, err


def test_model_path_missing(capsys, tmp_path, fact_file):
    code, err = run(capsys, *_train(tmp_path / "no-such-model", fact_file, tmp_path / "run"))
    _assert_error(code, err, "model path does not exist", "no-such-model")
    assert not (tmp_path / "run").exists()


def test_data_file_missing(capsys, tmp_path, tiny_dir):
    code, err = run(capsys, *_train(tiny_dir, tmp_path / "nope.jsonl", tmp_path / "run"))
    _assert_error(code, err, "data file not found", "nope.jsonl")


def test_malformed_json_line_names_file_and_line(capsys, tmp_path, tiny_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken}\n')
    code, err = run(capsys, *_train(tiny_dir, bad, tmp_path / "run"))
    _assert_error(code, err, f"{bad}:3", "malformed JSON")


def test_rows_without_supported_fields(capsys, tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "reply": "a"}])
    code, err = run(capsys, *_train(tiny_dir, data, tmp_path / "run"))
    _assert_error(code, err, f"{data}:1", "Found: query, reply", "messages", "conversations", "instruction + output",
                  "prompt + completion", "text", "data.columns")


def test_empty_dataset(capsys, tmp_path, tiny_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    code, err = run(capsys, *_train(tiny_dir, data, tmp_path / "run"))
    _assert_error(code, err, "no usable rows", "empty.jsonl")


def test_unknown_target_module_lists_linear_names(capsys, tmp_path, tiny_dir, fact_file):
    code, err = run(capsys, *_train(tiny_dir, fact_file, tmp_path / "run", "--lora-target-modules", "q_proj,qkv"))
    _assert_error(code, err, "unknown LoRA target module(s) qkv", "q_proj", "gate_proj", "down_proj")


def test_existing_run_dir_not_overwritten(capsys, tmp_path, tiny_dir, fact_file):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("output_dir: other\n")
    (run_dir / "precious.txt").write_text("keep me")
    code, err = run(capsys, *_train(tiny_dir, fact_file, run_dir))
    _assert_error(code, err, "already holds a previous qfine run", "--overwrite")
    assert (run_dir / "precious.txt").read_text() == "keep me"
    assert (run_dir / "config.yaml").read_text() == "output_dir: other\n"


def test_hub_id_while_offline(capsys, tmp_path, fact_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run(capsys, *_train("someone/some-model-that-is-not-cached", fact_file, tmp_path / "run"))
    _assert_error(code, err, "someone/some-model-that-is-not-cached", "HF_HUB_OFFLINE")


def test_paged_optimizer_on_cpu(capsys, tmp_path, tiny_dir, fact_file):
    code, err = run(capsys, *_train(tiny_dir, fact_file, tmp_path / "run", "--optimizer", "paged_adamw_8bit",
                                       "--device", "cpu"))
    _assert_error(code, err, "paged_adamw_8bit needs a CUDA GPU")


def test_bad_flag_value(capsys, tmp_path, tiny_dir, fact_file):
    code, err = run(capsys, *_train(tiny_dir, fact_file, tmp_path / "run", "--lora-r", "sixteen"))
    _assert_error(code, err, "lora.r", "expected int", "sixteen")


def test_every_unknown_yaml_key_is_named_at_once_with_the_closest_field(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trian:\n  seed: 1\nlearning_rate: 0.1\ntrain:\n  max_stepz: 3\n  lerning_rate: 1\n"
                   "lora:\n  rank: 8\n")
    code, err = run(capsys, "train", str(cfg))
    _assert_error(code, err, "unknown keys", "'trian' (did you mean train?)",
                  "'learning_rate' (a field of section 'train': write it under train:)",
                  "'train.max_stepz' (did you mean max_steps?)", "'train.lerning_rate' (did you mean learning_rate?)",
                  "'lora.rank' (known: r, alpha")


@pytest.mark.parametrize("typo, meant", [("--learnig-rate", "--learning-rate"), ("--lora-rank", "--lora-r"),
                                         ("--learning_rate", "--learning-rate"), ("--max_steps", "--max-steps")])
def test_a_mistyped_flag_gets_the_closest_flag(capsys, typo, meant):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", typo, "3", "--data", "x.jsonl"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"unknown flag: {typo} (did you mean {meant}?)" in err
    assert len(err.strip().splitlines()) == 2  # the one-line usage, then the error


def test_several_mistyped_flags_are_named_at_once(capsys):
    with pytest.raises(SystemExit):
        main(["data", "preview", "x.jsonl", "--maxseqlen", "3", "--exampel", "2"])
    err = capsys.readouterr().err
    assert "unknown flags: --maxseqlen (did you mean --max-seq-len?); --exampel (did you mean --example?)" in err


def test_prompt_too_long(capsys, tiny_dir):
    code, err = run(capsys, "generate", str(tiny_dir), "--prompt", "word " * 1100, "--max-new-tokens", "8")
    _assert_error(code, err, "exceeds the model's context of 1024 tokens")


def test_target_that_is_not_a_linear_layer(capsys, tmp_path, tiny_dir, fact_file):
    code, err = run(capsys, *_train(tiny_dir, fact_file, tmp_path / "run", "--lora-target-modules", "mlp"))
    _assert_error(code, err, "lora.target_modules: 'mlp' names LlamaMLP modules (e.g. model.layers.0.mlp)",
                  "q_proj", "all-linear")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,value,needle", [
    ("--lora-r", "0", "lora.r must be a whole number of at least 1, not 0"),
    ("--lora-alpha", "0", "lora.alpha must be greater than 0"),
    ("--lora-dropout", "1.5", "lora.dropout must be in [0, 1)"),
    ("--lora-bias", "some", "lora.bias must be one of none, all, lora_only"),
])
def test_lora_settings_out_of_range(capsys, tmp_path, tiny_dir, fact_file, flag, value, needle):
    code, err = run(capsys, *_train(tiny_dir, fact_file, tmp_path / "run", flag, value))
    _assert_error(code, err, needle)
    assert not (tmp_path / "run").exists()


def test_csv_row_with_a_nul_names_file_line_and_column(capsys, tmp_path, tiny_dir):
    data = tmp_path / "d.csv"
    data.write_text("prompt,completion\nhi,there\nbad\x00cell,x\nfine,yes\n", encoding="utf-8")
    code, err = run(capsys, *_train(tiny_dir, data, tmp_path / "run"))
    _assert_error(code, err, f"{data}:3", "column 'prompt' contains a NUL character")
    assert not (tmp_path / "run").exists()
    # with on_bad_rows skip the row is counted and training goes on
    code = main(list(_train(tiny_dir, data, tmp_path / "run", "--on-bad-rows", "skip", "--report-samples", "0")))
    assert code == 0 and "1 bad rows skipped" in capsys.readouterr().out


def test_csv_field_longer_than_pythons_default_limit_is_read(tmp_path):
    from qfine.data.readers import read_rows

    data = tmp_path / "d.csv"
    long = "word " * 40_000  # 200,000 characters; the csv module refuses over 131,072 by default
    data.write_text(f'prompt,completion\n"{long}",yes\nshort,no\n', encoding="utf-8")
    rows = list(read_rows(data))
    assert [w for w, _ in rows] == [f"{data}:2", f"{data}:3"]
    assert rows[0][1]["prompt"] == long and rows[1][1] == {"prompt": "short", "completion": "no"}


# Gemma's template, in short: it refuses a system turn and any order but user/assistant alternation
STRICT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture
def strict_model(tmp_path, tiny_dir):
    from transformers import AutoTokenizer

    out = tmp_path / "strict"
    shutil.copytree(tiny_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = STRICT_TEMPLATE
    tok.save_pretrained(out)
    return out


def test_chat_template_that_rejects_a_row_names_the_row(capsys, tmp_path, strict_model):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]}] * 2
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code, err = run(capsys, *_train(strict_model, data, tmp_path / "run"))
    _assert_error(code, err, f"{data}:2: the chat template rejects this conversation (user/user/assistant)",
                  "Conversation roles must alternate")
    code = main(list(_train(strict_model, data, tmp_path / "run", "--on-bad-rows", "skip", "--report-samples", "0")))
    assert code == 0 and "2 rows" in capsys.readouterr().out
    # a system prompt this template refuses: every row is bad, and the message says so
    code, err = run(capsys, *_train(strict_model, data, tmp_path / "run2", "--on-bad-rows", "skip",
                                    "--system-prompt", "Be brief."))
    _assert_error(code, err, "no usable rows", "4 bad rows skipped", "System role not supported")


def test_rows_with_no_token_to_predict(capsys, tmp_path, tiny_dir):
    # max_seq_len 1 leaves one token: nothing before it to predict it from
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}] * 3)
    code, err = run(capsys, *_train(tiny_dir, data, tmp_path / "run", "--max-seq-len", "1"))
    _assert_error(code, err, "no usable rows")
    assert not (tmp_path / "run").exists()


def test_resume_and_overwrite_together(capsys, tmp_path, tiny_dir, fact_file):
    code, err = run(capsys, *_train(tiny_dir, fact_file, tmp_path / "run", "--resume", "--overwrite"))
    _assert_error(code, err, "--resume and --overwrite")


def test_a_bad_data_row_is_named_before_the_model_weights_load(capsys, tmp_path, tiny_dir, monkeypatch):
    import qfine.training.run as run_module

    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("the weights loaded before the data"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    code, err = run(capsys, *_train(tiny_dir, bad, tmp_path / "run"))
    _assert_error(code, err, f"{bad}:2", "malformed JSON")


def test_a_max_seq_len_past_the_models_context_is_refused(capsys, tmp_path, tiny_dir, fact_file):
    code, err = run(capsys, *_train(tiny_dir, fact_file, tmp_path / "run", "--max-seq-len", "1000000"))
    _assert_error(code, err, "data.max_seq_len 1000000 is longer than the model's context of 1,024 tokens")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_names_the_last_checkpoint_and_the_command_that_continues(capsys, tmp_path, tiny_dir, fact_file,
                                                                         monkeypatch):
    from transformers import TrainerCallback

    import qfine.training.run as run_module

    class CtrlC(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    real = run_module.build_trainer

    def interrupted_trainer(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(CtrlC())
        return trainer

    monkeypatch.setattr(run_module, "build_trainer", interrupted_trainer)
    out = tmp_path / "run"
    code, err = run(capsys, *_train(tiny_dir, fact_file, out, "--max-steps", "6", "--save-steps", "2"))
    assert code == 2
    assert f"the last checkpoint is {out / 'checkpoints' / 'checkpoint-2'} (step 2)" in err
    assert "Continue with: qfine train --model" in err and err.strip().endswith("--resume")
