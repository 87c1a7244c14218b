"""``qfine chat``: an interactive, streaming chat with line editing, history and slash commands."""

from __future__ import annotations

import atexit
import dataclasses
import sys
from typing import TextIO

from qfine.generation.generate import stream
from qfine.models.loading import Loaded
from qfine.models.sources import cache_root
from qfine.util.errors import QfineError

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
        import readline  # here: importing it changes how input() reads the terminal

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
