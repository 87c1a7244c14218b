"""Bad input: one clear message, exit status 2, no traceback, nothing overwritten."""

from __future__ import annotations


from qfine.cli import main

from helpers import write_jsonl


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


def test_unknown_yaml_key(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_stepz: 3\n")
    code, err = run(capsys, "train", str(cfg))
    _assert_error(code, err, "unknown field 'train.max_stepz'", "max_steps")


def test_prompt_too_long(capsys, tiny_dir):
    code, err = run(capsys, "generate", str(tiny_dir), "--prompt", "word " * 300, "--max-new-tokens", "8")
    _assert_error(code, err, "exceeds the model's context of 256 tokens")
