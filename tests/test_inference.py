"""generate / chat: completion only on stdout, streaming equals one-shot generation."""

from __future__ import annotations

import io

import torch

from qfine.cli import main
from qfine.generation.chat import chat
from qfine.generation.generate import generate, stream
from qfine.generation.load import load_for_inference


def test_generate_cli_prints_only_the_completion(tiny_dir, capsys):
    loaded = load_for_inference(str(tiny_dir))
    expected = generate(loaded, "Hello there", max_new_tokens=12)
    assert main(["generate", str(tiny_dir), "--prompt", "Hello there", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out == expected + "\n"
    assert "Hello there" not in out and "<|im_start|>" not in out


def test_stream_equals_generate_and_chat_keeps_history(tiny_dir):
    loaded = load_for_inference(str(tiny_dir))
    msgs = [{"role": "user", "content": "Hi"}]
    assert "".join(stream(loaded, msgs, max_new_tokens=10)) == generate(loaded, msgs, max_new_tokens=10)

    first = generate(loaded, "Hi", max_new_tokens=10)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "More"}]
    second = generate(loaded, history, max_new_tokens=10)
    fresh = generate(loaded, "More", max_new_tokens=10)
    out = io.StringIO()
    chat(loaded, max_new_tokens=10, stdin=io.StringIO("Hi\nMore\n/reset\nMore\n/exit\n"), stdout=out)
    text = out.getvalue()
    assert f"> {first}\n> {second}\n> [conversation cleared]\n> {fresh}\n> \n" in text


def test_chat_slash_commands_are_never_sent_to_the_model(tiny_dir, monkeypatch):
    import qfine.generation.chat as inference

    loaded = load_for_inference(str(tiny_dir))
    seen, real = [], inference.stream

    def spying(lo, messages, *a, **k):  # records what reaches generation
        seen.append([dict(m) for m in messages])
        return real(lo, messages, *a, **k)

    monkeypatch.setattr(inference, "stream", spying)
    out = io.StringIO()
    chat(loaded, max_new_tokens=4, stdout=out,
         stdin=io.StringIO("/help\n/frobnicate\n/system Be brief.\n/max-tokens 2\n/temperature x\n//slash\n/quit\n"))
    text = out.getvalue()
    assert "/system TEXT" in text  # the help
    assert "[unknown command /frobnicate; /help lists them]" in text
    assert "[/temperature needs a number, not 'x']" in text
    assert seen == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "/slash"}]]


def test_sampling_is_seeded_and_differs_from_greedy(tiny_dir):
    loaded = load_for_inference(str(tiny_dir))
    torch.manual_seed(0)
    a = generate(loaded, "Hi", max_new_tokens=12, temperature=1.5, top_p=1.0)
    torch.manual_seed(0)
    b = generate(loaded, "Hi", max_new_tokens=12, temperature=1.5, top_p=1.0)
    assert a == b
    assert a != generate(loaded, "Hi", max_new_tokens=12)


def test_chat_survives_a_generation_that_raises(tiny_dir, monkeypatch):
    """Generation runs in a thread feeding a streamer; if it raises, chat must neither hang waiting
    for text nor end the session: the turn reports the error and the next one works."""
    import threading

    from qfine.generation import engine

    loaded = load_for_inference(str(tiny_dir))
    real = engine.generate_tokens
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "generate_tokens", flaky)
    out = io.StringIO()
    t = threading.Thread(target=chat, args=(loaded, 6), kwargs=dict(stdin=io.StringIO("Hi\nHi\n/exit\n"), stdout=out),
                         daemon=True)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "chat hung after a failed generation"
    text = out.getvalue()
    assert "[generation failed: RuntimeError: CUDA out of memory (simulated)]" in text
    assert len(calls) == 2
    assert text.endswith(generate(loaded, "Hi", max_new_tokens=6) + "\n> \n")


def test_a_run_is_served_and_scored_with_its_own_data_settings(tiny_dir, tmp_path):
    """A run trained with a system prompt and the alpaca template answers and is scored with them."""
    from helpers import FACT, tiny_config, write_jsonl
    from qfine.data.pipeline import row_messages
    from qfine.evaluation.run import load_examples
    from qfine.training import train

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 4)
    cfg = tiny_config(tiny_dir, data, tmp_path / "run", max_steps=2, report_samples=0)
    cfg.data.system_prompt, cfg.data.template = "You are a calendar.", "alpaca"
    run = train(cfg)
    loaded = load_for_inference(str(run))
    assert loaded.data.system_prompt == "You are a calendar."
    with_system = [{"role": "system", "content": "You are a calendar."}, FACT[0]]
    got = generate(loaded, FACT[0]["content"], max_new_tokens=8)
    loaded.data = None  # the same model served without the run's settings
    assert got == generate(loaded, with_system, max_new_tokens=8)
    assert "You are a calendar." in loaded.tokenizer.apply_chat_template(with_system, tokenize=False)
    # qfine eval reads rows as training did: same system prompt, same token ids
    examples = load_examples(data, loaded.tokenizer, cfg.data)
    assert examples[0].prompt[0] == {"role": "system", "content": "You are a calendar."}
    assert row_messages({"messages": FACT}, cfg.data)[0]["role"] == "system"
