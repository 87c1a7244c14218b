"""Generation and streaming chat on a base model (quantized as trained) with an optional adapter."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from threading import Thread
from typing import Iterator, TextIO

import torch
from transformers import TextIteratorStreamer

from qfine import config as C
from qfine.data.pipeline import render
from qfine.data.templates import set_template
from qfine.methods.lora import load_adapter
from qfine.methods.multitask import check_task, load_task, run_tasks
from qfine.models.loading import Loaded, load_model, prequantized, resolve_device
from qfine.models.sources import resolve_source, written_dtype
from qfine.util.compare import relative_difference
from qfine.util.errors import QfineError


def is_run_dir(path: str | Path) -> bool:
    """A qfine run directory has config.yaml and adapter/adapter_config.json (a multi-task run:
    adapter/shared/adapter_config.json)."""
    p = Path(path)
    return (p / "config.yaml").is_file() and any((p / "adapter" / sub / "adapter_config.json").is_file()
                                                 for sub in ("", "shared"))


def load_for_inference(target: str, model_cfg: C.ModelConfig | None = None, task: str | None = None) -> Loaded:
    """Load a run directory (its base, quantized as in training, + its adapter) or a model source.

    A plain model source is served as it was written (:func:`as_written`: a merged folder in its saved
    dtype, a GGUF at its file's precision), unless ``model_cfg`` says how to load it; quantizing an
    unquantized source then prints its measured cost (:func:`quantization_cost`).
    ``task``: a multi-task run's task, whose adapter is then active with the shared one (required
    for such a run, refused for any other).
    """

    if is_run_dir(target):
        cfg = C.load_yaml(Path(target) / "config.yaml")
        labels = None
        if cfg.model.task == "seq-cls":
            from qfine.models.heads import read_labels

            labels = read_labels(Path(target))
        adapter_dir = Path(target) / "adapter"
        multi = bool(run_tasks(adapter_dir))
        if task is not None and not multi:
            raise QfineError(f"--task: {target} is not a multi-task run (it has one adapter)")
        if multi:
            check_task(adapter_dir, task)  # before the base is loaded
        loaded = load_model(cfg.model, labels)
        loaded.model = (load_task(loaded.model, adapter_dir, task) if multi
                        else load_adapter(loaded.model, adapter_dir))
        loaded.data, loaded.generation = cfg.data, cfg.generation
        template = cfg.data.template
    else:
        if task is not None:
            raise QfineError(f"--task needs a multi-task run directory, not {target}")
        if Path(target).is_dir() and (Path(target) / "config.yaml").is_file():
            raise QfineError(f"{target} looks like a qfine run without a finished adapter (adapter/ missing)")
        if model_cfg is None:
            loaded = load_model(as_written(target))
        else:
            mc = dataclasses.replace(model_cfg, source=target)
            loaded = load_model(mc)
            if mc.quantization != "none" and not prequantized(loaded.source):
                print(f"[qfine] {quantization_cost(loaded, mc)}", file=sys.stderr, flush=True)
        template = "auto"
    loaded.model.eval()
    loaded.model.config.use_cache = True
    if loaded.task == "causal-lm":
        set_template(loaded.tokenizer, template)
    return loaded


def as_written(source: str) -> C.ModelConfig:
    """How to load ``source`` so that it computes what was saved: no quantization (a folder saved
    quantized keeps its own), weights in their saved dtype. On the CPU a 16-bit folder is widened to
    fp32 (exactly: every fp16/bf16 value is an fp32 value), which the CPU computes faster."""
    dtype = written_dtype(resolve_source(source)) or "auto"
    if resolve_device("auto") == "cpu" and dtype in ("fp16", "bf16"):
        dtype = "fp32"
    return C.ModelConfig(source=source, quantization="none", compute_dtype=dtype)


# The fixed prompt a load-time quantization is measured on: a chat turn, so that the template's tokens count too.
_COST_PROMPT = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]


@torch.no_grad()
def quantization_cost(quantized: Loaded, cfg: C.ModelConfig) -> str:
    """A line giving how far ``quantized`` (``source`` loaded per ``cfg``) answers from the same source
    as written: the relative L2 difference of their logits on a fixed prompt. The unquantized model is
    loaded for the measurement and freed; where it does not fit, the line says so."""

    set_template(quantized.tokenizer, "auto")
    ids = encode_prompt(quantized.tokenizer, _COST_PROMPT)
    got = quantized.model(input_ids=ids.to(quantized.device)).logits.float().cpu()
    try:
        reference = load_model(as_written(cfg.source))
        want = reference.model(input_ids=ids.to(reference.device)).logits.float().cpu()
    except torch.OutOfMemoryError:
        return (f"{cfg.source} quantized to {cfg.quantization} on load, as asked; its cost was not measured (the "
                "unquantized model does not fit beside it)")
    return (f"{cfg.source} quantized to {cfg.quantization} on load, as asked: its logits differ from the model as "
            f"written by {relative_difference(got, want):.3e} (relative L2, on a fixed prompt); omit --quantization "
            "to serve it as written")


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


@torch.no_grad()
def generate(loaded: Loaded, prompt: str | list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0) -> str:
    """The completion only (prompt excluded, special tokens skipped); greedy unless temperature > 0."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    messages = with_system_prompt(messages, loaded.data)
    ids = encode_prompt(loaded.tokenizer, messages, loaded.model, max_new_tokens).to(loaded.device)
    out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                **_gen_kwargs(loaded.tokenizer, max_new_tokens, temperature, top_p))
    return loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


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


CHAT_HELP = """commands:
  /help              this list
  /reset             forget the conversation
  /system TEXT       set the system prompt (and forget the conversation); /system alone clears it
  /temperature T     0 = greedy; > 0 samples
  /max-tokens N      longest reply
  /exit, /quit       leave (Ctrl-D too)
a line starting with // is sent as a message starting with /"""


@dataclasses.dataclass
class ChatState:
    """What a chat session carries between turns."""

    max_new_tokens: int
    temperature: float
    top_p: float
    system: str | None = None
    history: list = dataclasses.field(default_factory=list)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history


def chat_command(state: ChatState, line: str) -> str | None:
    """Apply a slash command to ``state``; returns the text to show, or None for /exit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return None
    if name == "/help":
        return CHAT_HELP
    if name == "/reset":
        state.history = []
        return "[conversation cleared]"
    if name == "/system":
        state.system, state.history = arg or None, []
        return f"[system prompt {'set' if arg else 'cleared'}; conversation cleared]"
    try:
        if name == "/temperature":
            state.temperature = max(0.0, float(arg))
            return f"[temperature {state.temperature:g}]"
        if name in ("/max-tokens", "/max"):
            state.max_new_tokens = max(1, int(arg))
            return f"[replies of at most {state.max_new_tokens} tokens]"
    except ValueError:
        return f"[{name} needs a number, not {arg!r}]"
    return f"[unknown command {name}; /help lists them]"


def _line_reader(stdin: TextIO, stdout: TextIO):
    """A function that reads one user line (None at end of input). On a terminal it is ``input`` with
    readline's line editing and a history kept in the qfine cache across sessions."""
    if stdin is sys.stdin and stdin.isatty():
        import atexit
        import readline

        from qfine.models.sources import cache_root

        history = cache_root() / "chat_history"
        try:
            readline.read_history_file(history)
        except OSError:
            pass
        readline.set_history_length(1000)

        def save():
            try:
                history.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(history)
            except OSError:
                pass

        atexit.register(save)

        def read():
            try:
                return input("> ")
            except EOFError:
                return None
        return read

    def read_plain():
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        return line.rstrip("\n") if line else None
    return read_plain


def chat(loaded: Loaded, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
         stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """Interactive chat: one user line per turn, the reply streamed; slash commands (:data:`CHAT_HELP`)."""
    state = ChatState(max_new_tokens, temperature, top_p)
    read = _line_reader(stdin, stdout)
    stdout.write("qfine chat — /help lists the commands, /exit or Ctrl-D quits\n")
    while True:
        line = read()
        text = line.strip() if line is not None else None
        if text is not None and text.startswith("/") and not text.startswith("//"):
            shown = chat_command(state, text)
            if shown is None:
                text = None
            else:
                stdout.write(shown + "\n")
                continue
        if text is None:
            stdout.write("\n")
            return
        if not text:
            continue
        state.history.append({"role": "user", "content": text[1:] if text.startswith("//") else text})
        reply = []
        try:
            for piece in stream(loaded, state.messages(), state.max_new_tokens, state.temperature, state.top_p):
                reply.append(piece)
                stdout.write(piece)
                stdout.flush()
        except QfineError as e:
            state.history.pop()
            stdout.write(f"[{e}]\n")
            continue
        except Exception as e:  # noqa: BLE001 - a failed reply (out of memory, say) ends the turn, not the session
            state.history.pop()
            stdout.write(f"\n[generation failed: {type(e).__name__}: {e}]\n")
            continue
        stdout.write("\n")
        state.history.append({"role": "assistant", "content": "".join(reply)})
