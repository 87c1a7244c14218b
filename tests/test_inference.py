"""generate / chat: completion only on stdout, streaming equals one-shot generation."""

from __future__ import annotations

import io

import torch

from qfine.cli import main
from qfine.inference import chat, generate, load_for_inference, stream


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
    assert f"> {first}\n> {second}\n> > {fresh}\n> \n" in text


def test_sampling_is_seeded_and_differs_from_greedy(tiny_dir):
    loaded = load_for_inference(str(tiny_dir))
    torch.manual_seed(0)
    a = generate(loaded, "Hi", max_new_tokens=12, temperature=1.5, top_p=1.0)
    torch.manual_seed(0)
    b = generate(loaded, "Hi", max_new_tokens=12, temperature=1.5, top_p=1.0)
    assert a == b
    assert a != generate(loaded, "Hi", max_new_tokens=12)
