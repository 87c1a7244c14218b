"""Generation on a loaded model (base + adapter, or a plain model): greedy or sampled replies to chat
prompts, whole or streamed piece by piece.

Llama-family models go through :mod:`qfine.generation.engine` (static KV cache, CUDA-graphed decode,
4-bit small-row kernel); any other model, or ``QFINE_GENERATE=transformers``, through transformers'
``generate``. Greedy output is the same token for token (fp32; ``tests/test_engine.py``)."""

from __future__ import annotations

import os
from threading import Thread
from typing import Iterator

import torch
from transformers import TextIteratorStreamer

from qfine import config as C
from qfine.data.pipeline import render
from qfine.generation import engine
from qfine.models.loading import Loaded
from qfine.util.errors import QfineError


def _context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def with_system_prompt(messages: list[dict], data: C.DataConfig | None) -> list[dict]:
    """``messages`` with the run's system prompt in front when it has one and they have none (as in training)."""
    if data is not None and data.system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": data.system_prompt}, *messages]
    return messages


def encode_prompt(tokenizer, messages: list[dict], model=None, max_new_tokens: int = 0) -> torch.Tensor:
    """Token ids (1, seq) of ``messages`` rendered with the chat template and the generation prompt."""

    text = render(tokenizer, messages, add_generation_prompt=True, where="prompt")
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    ctx = _context_length(model) if model is not None else None
    if ctx and ids.shape[1] + max_new_tokens > ctx:
        raise QfineError(f"prompt is {ids.shape[1]} tokens; with --max-new-tokens {max_new_tokens} it exceeds the "
                         f"model's context of {ctx} tokens")
    return ids


def _gen_kwargs(tokenizer, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def uses_engine(model) -> bool:
    """Whether qfine's engine generates for ``model`` (else transformers' ``generate``)."""
    return os.environ.get("QFINE_GENERATE", "engine") != "transformers" and engine.unsupported_reason(model) is None


def _engine_kwargs(tokenizer, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return dict(max_new_tokens=max_new_tokens, stop_ids=[tokenizer.eos_token_id], pad_id=pad,
                temperature=temperature, top_p=top_p if temperature > 0 else 1.0)


@torch.no_grad()
def generate(loaded: Loaded, prompt: str | list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0) -> str:
    """The completion only (prompt excluded, special tokens skipped); greedy unless temperature > 0."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    messages = with_system_prompt(messages, loaded.data)
    ids = encode_prompt(loaded.tokenizer, messages, loaded.model, max_new_tokens).to(loaded.device)
    if uses_engine(loaded.model):
        got = engine.generate_tokens(loaded.model, [ids[0].tolist()],
                                     **_engine_kwargs(loaded.tokenizer, max_new_tokens, temperature, top_p))
        return loaded.tokenizer.decode(got.tokens[0], skip_special_tokens=True)
    out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                **_gen_kwargs(loaded.tokenizer, max_new_tokens, temperature, top_p))
    return loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def greedy_replies(model, tokenizer, prompt_ids: list[list[int]], max_new: int, batch_size: int = 16) -> list[str]:
    """The greedy reply text to each prompt (token ids), batched through qfine's engine where it serves
    the model, else one ``generate`` call per prompt."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for i in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[i: i + batch_size]
        if uses_engine(model):
            tokens = engine.generate_tokens(model, chunk, max_new, [tokenizer.eos_token_id], pad).tokens
        else:
            device = next(model.parameters()).device
            tokens = []
            for p in chunk:
                ids = torch.tensor([p], device=device)
                with torch.no_grad():
                    got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                         do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
                tokens.append(got[0, len(p):].tolist())
        out += [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return out


def stream(loaded: Loaded, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0) -> Iterator[str]:
    """Yield the reply to ``messages`` piece by piece as it is generated.

    Generation runs in a thread that feeds a streamer. If it raises, the streamer is ended all the
    same (else the reader would wait for text forever) and the error is raised here, in the caller.
    """


    messages = with_system_prompt(messages, loaded.data)
    ids = encode_prompt(loaded.tokenizer, messages, loaded.model, max_new_tokens).to(loaded.device)
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
              **_gen_kwargs(loaded.tokenizer, max_new_tokens, temperature, top_p))
    failed: list[BaseException] = []

    def run():
        try:
            if uses_engine(loaded.model):
                streamer.put(ids.cpu())  # the prompt, which the streamer skips
                engine.generate_tokens(loaded.model, [ids[0].tolist()], on_token=lambda t: streamer.put(t.cpu()),
                                       **_engine_kwargs(loaded.tokenizer, max_new_tokens, temperature, top_p))
                streamer.end()
                return
            with torch.no_grad():
                loaded.model.generate(**kw)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
            failed.append(e)
            streamer.end()

    thread = Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if failed:
        raise failed[0]
