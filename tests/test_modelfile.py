"""The Ollama Modelfile written beside each GGUF: its Go template, cut from the model's own chat
template, must format conversations exactly as transformers' apply_chat_template does (BOS aside,
where the runtime adds it), for the chat templates of the families qfine exports."""

from __future__ import annotations

from pathlib import Path

import pytest

from qfine.export import modelfile as M

CHATML_DEFAULT_SYSTEM = (  # SmolLM2's
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
    "are supported!') }}{% endif %}{% endfor %}")
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")


def _tokenizer(family: str):
    import test_gguf_sentencepiece as spm
    import test_gguf_tokenizers as bpe

    if family == "chatml":
        tok = bpe._tokenizer("smollm")
        tok.chat_template = CHATML_DEFAULT_SYSTEM
    elif family == "llama3":
        tok = bpe._tokenizer("llama3")
        tok.chat_template, tok.add_bos_token = LLAMA3, True
    else:
        tok = spm._tokenizer(family)
        tok.chat_template = MISTRAL if family == "mistral" else GEMMA
    return tok


CONVERSATIONS = [
    [{"role": "user", "content": "Tell me a {{story}} about {% braces %}."}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"},
     {"role": "assistant", "content": "four"}, {"role": "user", "content": "five\nlines"}],
]
SYSTEM = [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello?"},
          {"role": "assistant", "content": "Bonjour."}, {"role": "user", "content": "Merci"}]


@pytest.mark.parametrize("family,end,system", [("chatml", "<|im_end|>\n", True), ("llama3", "<|eot_id|>", True),
                                               ("mistral", "</s>", False), ("gemma", "<end_of_turn>\n", False)])
def test_the_go_template_formats_as_the_chat_template(family, end, system, tmp_path):
    tok = _tokenizer(family)
    w = M.wrappers(tok)
    assert w["assistant_post"] == end and w["system"] is system
    bos = tok.bos_token if getattr(tok, "add_bos_token", False) else ""
    for messages in CONVERSATIONS + ([SYSTEM] if system else []):
        for gen in (True, False):
            want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert bos + M.render(w, messages, gen) == want, (messages, gen)
    text = M.modelfile(tmp_path / "m.gguf", tok)
    assert text.splitlines()[1] == "FROM ./m.gguf"
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == M.go_template(w) and "{{-" not in template and "-}}" not in template
    assert f'PARAMETER stop "{end.strip()}"' in text
    assert ('SYSTEM """You are a helpful AI assistant named SmolLM' in text) is (family == "chatml")
    assert ("system messages are left out" in text) is (not system)


def test_literal_braces_in_a_template_are_escaped_for_go():
    w = {"system": True, "system_pre": "{{", "system_post": "", "user_pre": "[", "user_post": "]", "assistant_pre": "",
         "assistant_post": "", "generation": "", "default_system": ""}
    assert M.go_template(w).startswith('{{range .Messages}}{{if eq .Role "system"}}{{"{{"}}{{.Content}}')


def test_a_template_that_cannot_be_cut_is_left_to_ollama(tmp_path):
    tok = _tokenizer("chatml")
    tok.chat_template = ("{% for m in messages %}{{ loop.index }}:{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}>{% endif %}")
    text = M.modelfile(Path(tmp_path / "m.gguf"), tok)
    assert 'TEMPLATE """' not in text and "# no TEMPLATE:" in text and "FROM ./m.gguf" in text
