"""An Ollama ``Modelfile`` beside each GGUF file: ``ollama create NAME -f FILE.Modelfile``.

Ollama formats a conversation with a Go text/template over ``.Messages`` (each with ``.Role`` and
``.Content``). qfine derives it from the model's own chat template by rendering conversations of
marker strings and cutting the output at the markers: what the template writes before and after a
system, a user and an assistant message, and the generation prompt. The Go template is one line of
literal text and ``{{if eq .Role ...}}`` branches — no whitespace-trimming markers, which would eat
the newlines many templates put after a message. A default system prompt that the chat template adds
when none is given becomes ``SYSTEM``; the end-of-turn strings become ``stop`` parameters; sampling
defaults come from generation_config.json when the model has one.

A chat template whose output cannot be cut that way (one that formats a message differently by its
position, say) is reported in the file as a comment and left to Ollama's own template detection
from the GGUF's ``tokenizer.chat_template``.
"""

from __future__ import annotations

import json
from pathlib import Path

from qfine.util.files import atomic_write_text

S, U, A, V = "\x02SYS\x03", "\x02USR\x03", "\x02AST\x03", "\x02USR2\x03"


class NotCuttable(ValueError):
    pass


def _render(tokenizer, messages, gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _between(text: str, left: str | None, right: str) -> str:
    start = text.index(left) + len(left) if left else 0
    end = text.index(right, start)
    return text[start:end]


def wrappers(tokenizer) -> dict[str, str]:
    """:func:`cut` of the chat template: with a BOS token the template writes at the start (and the
    tokenizer does not add) as part of the first message's text, or else apart (key ``bos``)."""
    try:
        return cut(tokenizer, False)
    except NotCuttable:
        if getattr(tokenizer, "add_bos_token", False) or not tokenizer.bos_token:
            raise
        return cut(tokenizer, True)


def cut(tokenizer, bos_apart: bool) -> dict[str, str]:
    """What the chat template writes around each role's message: keys ``system_pre``, ``system_post``,
    ``user_pre``, ``user_post``, ``assistant_pre``, ``assistant_post``, ``generation`` (the prompt
    that opens the reply), ``default_system`` (the system prompt added when none is given, or "").
    The text between an assistant message and the next user message is cut after its first special
    token and the whitespace behind it (``<|im_end|>\\n`` | ``<|im_start|>user\\n``). The BOS token is
    left out where the tokenizer adds it (the runtime does too). :class:`NotCuttable` when the output
    does not decompose that way."""
    bos = (tokenizer.bos_token or "") if getattr(tokenizer, "add_bos_token", False) or bos_apart else ""
    try:
        one = _render(tokenizer, [{"role": "user", "content": U}], False)
        gen_one = _render(tokenizer, [{"role": "user", "content": U}], True)
        turns = _render(tokenizer, [{"role": "user", "content": U}, {"role": "assistant", "content": A},
                                    {"role": "user", "content": V}], True)
    except Exception as e:  # a template may refuse a system role or a shape; then Ollama's detection decides
        raise NotCuttable(f"the chat template does not render plain conversations ({type(e).__name__}: {e})") from e
    if not gen_one.startswith(one):
        raise NotCuttable("the generation prompt is not appended to the conversation")
    unbos = (lambda t: t[len(bos):] if bos and t.startswith(bos) else t)
    w = {"generation": gen_one[len(one):], "user_post": one[one.index(U) + len(U):],
         "bos": bos if bos_apart and one.startswith(bos) else ""}
    after_user = _between(turns, U, A)  # user_post + assistant_pre
    if not after_user.startswith(w["user_post"]):
        raise NotCuttable("a user message ends differently in a longer conversation")
    w["assistant_pre"] = after_user[len(w["user_post"]):]
    between = _between(turns, A, V)  # assistant_post + user_pre
    lead = unbos(one[:one.index(U)])  # default system block + user_pre
    specials = [t for t in tokenizer.all_special_tokens if t and t in between]
    if specials:
        first = min(specials, key=lambda t: (between.index(t), -len(t)))
        cut = between.index(first) + len(first)
        cut += len(between[cut:]) - len(between[cut:].lstrip())
        w["assistant_post"], w["user_pre"] = between[:cut], between[cut:]
    elif between.endswith(lead):
        w["assistant_post"], w["user_pre"] = between[:len(between) - len(lead)], lead
    else:
        raise NotCuttable("no special token ends an assistant message")
    if not lead.endswith(w["user_pre"]):
        raise NotCuttable("the first user message starts differently from the others")
    try:
        with_sys = _render(tokenizer, [{"role": "system", "content": S}, {"role": "user", "content": U}], True)
    except Exception:  # Gemma's, Mistral's: no system role; Ollama's system messages are then left out
        with_sys = None
    w["system"] = with_sys is not None
    w["system_pre"] = w["system_post"] = ""
    if with_sys is not None:
        sys_mid = _between(with_sys, S, U)
        if not sys_mid.endswith(w["user_pre"]):
            raise NotCuttable("a user message starts differently after a system message")
        w["system_pre"] = unbos(with_sys[:with_sys.index(S)])
        w["system_post"] = sys_mid[:len(sys_mid) - len(w["user_pre"])]
    default = lead[:len(lead) - len(w["user_pre"])]
    w["default_system"] = ""
    if default:
        if not (default.startswith(w["system_pre"]) and default.endswith(w["system_post"])):
            raise NotCuttable("the template adds text before the first message that is not a system message")
        w["default_system"] = default[len(w["system_pre"]):len(default) - len(w["system_post"])]
    for messages in _SAMPLES if w["system"] else _SAMPLES[::2]:
        for gen in (True, False):
            if unbos(_render(tokenizer, messages, gen)) != render(w, messages, gen)[len(w["bos"]):]:
                raise NotCuttable("the template formats a message differently by its position")
    return w


_SAMPLES = [[{"role": "user", "content": "Hi there"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
             {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}]]


def render(w: dict[str, str], messages: list[dict], generation: bool = True) -> str:
    """What Ollama makes of ``messages`` with :func:`go_template` and ``SYSTEM`` (its default system
    message when the conversation has none), less a BOS token the runtime adds."""
    if w["default_system"] and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": w["default_system"]}] + messages
    out = "".join(w[f"{m['role']}_pre"] + m["content"] + w[f"{m['role']}_post"] for m in messages
                  if m["role"] != "system" or w["system"])
    return w.get("bos", "") + out + (w["generation"] if generation else "")


def _go_literal(text: str) -> str:
    return text.replace("{{", '{{"{{"}}')


def go_template(w: dict[str, str]) -> str:
    """Ollama's TEMPLATE for :func:`wrappers`' pieces (one line; literal text kept exactly)."""
    L = {k: _go_literal(v) for k, v in w.items() if isinstance(v, str)}
    system = L["system_pre"] + "{{.Content}}" + L["system_post"] if w["system"] else ""
    return (L.get("bos", "") + '{{range .Messages}}{{if eq .Role "system"}}' + system
            + '{{else if eq .Role "user"}}' + L["user_pre"] + "{{.Content}}" + L["user_post"]
            + "{{else}}" + L["assistant_pre"] + "{{.Content}}" + L["assistant_post"] + "{{end}}{{end}}"
            + L["generation"])


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile(gguf: Path, tokenizer, model_folder: Path | None = None, adapter: Path | None = None) -> str:
    """The Modelfile text for ``gguf`` (FROM is the file's name: keep them side by side), with a GGUF
    LoRA ``adapter`` on it when given (``ADAPTER``)."""
    named = adapter or gguf
    lines = [f"# Ollama: ollama create NAME -f {named.name}.Modelfile  (written by qfine export)",
             f"FROM ./{gguf.name}"]
    if adapter is not None:
        lines.append(f"ADAPTER ./{adapter.name}")
    stops: list[str] = []
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        try:
            w = wrappers(tokenizer)
        except NotCuttable as e:
            lines.append(f"# no TEMPLATE: {e}; Ollama reads the chat template from the GGUF file")
        else:
            lines.append(f'TEMPLATE """{go_template(w)}"""')
            if not w["system"]:
                lines.append("# the chat template has no system role: system messages are left out")
            if w["default_system"]:
                lines.append(f'SYSTEM """{w["default_system"]}"""')
            specials = set(tokenizer.all_special_tokens)
            stops += [t for t in specials if t and t in w["assistant_post"]]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines += [f"PARAMETER stop {_quoted(s)}" for s in sorted(stops)]
    gen = model_folder / "generation_config.json" if model_folder else None
    if gen and gen.is_file():
        cfg = json.loads(gen.read_text())
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                             ("repetition_penalty", "repeat_penalty")):
            if cfg.get(ours) is not None and (ours != "temperature" or cfg.get("do_sample", True)):
                lines.append(f"PARAMETER {theirs} {cfg[ours]}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf: Path, tokenizer, model_folder: str | Path | None = None,
                    adapter: Path | None = None) -> Path:
    """Write ``GGUF.Modelfile`` (or ``ADAPTER.Modelfile``) beside the file; returns its path."""
    named = adapter or gguf
    path = named.with_name(named.name + ".Modelfile")
    folder = Path(model_folder) if model_folder and Path(model_folder).is_dir() else None
    atomic_write_text(path, modelfile(gguf, tokenizer, folder, adapter))
    return path
