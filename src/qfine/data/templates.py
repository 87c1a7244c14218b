"""Built-in chat templates (Jinja, like a tokenizer's own) for tokenizers that have none.

Each renders ``messages`` (system/user/assistant) and, with ``add_generation_prompt``, ends where
the assistant reply starts. Assistant turns end with the tokenizer's EOS, which the loss covers.
The alpaca and qa layouts read the parts that :mod:`qfine.data.formats` keeps on the user message
(``instruction``/``input``, ``question``/``context``) and fall back to its ``content``.
"""

from __future__ import annotations

from qfine.util.errors import QfineError

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA2 = (
    "{% set ns = namespace(sys='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.sys = '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' %}"
    "{% elif m['role'] == 'user' %}{{ bos_token + '[INST] ' + ns.sys + m['content'] + ' [/INST] ' }}"
    "{% set ns.sys = '' %}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

ALPACA = (
    "{% set ns = namespace(pre='Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.pre = m['content'] %}"
    "{% elif m['role'] == 'user' %}{{ ns.pre + '\n\n### Instruction:\n' + (m['instruction'] or m['content']) }}"
    "{% if m['input'] %}{{ '\n\n### Input:\n' + m['input'] }}{% endif %}{{ '\n\n### Response:\n' }}"
    "{% else %}{{ m['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
)

QA = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}"
    "{% if m['context'] %}{{ '### CONTEXT\n' + m['context'] + '\n\n' }}{% endif %}"
    "{{ '### QUESTION\n' + (m['question'] or m['content']) + '\n\n### ANSWER\n' }}"
    "{% else %}{{ m['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
)

BUILTIN = {"chatml": CHATML, "llama2": LLAMA2, "alpaca": ALPACA, "qa": QA}
TEMPLATE_NAMES = ["auto", "tokenizer", *BUILTIN]


def set_template(tokenizer, name: str = "auto") -> str:
    """Install the template ``name`` on ``tokenizer``; returns the name in effect.

    ``auto`` keeps the tokenizer's own chat template and uses ChatML when it has none;
    ``tokenizer`` insists on the tokenizer's own.
    """
    own = getattr(tokenizer, "chat_template", None)
    if name == "auto":
        if own:
            return "tokenizer"
        name = "chatml"
    if name == "tokenizer":
        if not own:
            raise QfineError("data.template is 'tokenizer' but this tokenizer has no chat template; "
                             f"choose one of {', '.join(BUILTIN)}")
        return name
    if name not in BUILTIN:
        raise QfineError(f"data.template must be one of {', '.join(TEMPLATE_NAMES)}, not {name!r}")
    tokenizer.chat_template = BUILTIN[name]
    return name
