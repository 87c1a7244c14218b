"""GRPO's reward functions: the built-ins and the user's own, each call checked.

A reward function is called as ``f(prompts, completions, **columns)``: one prompt (a message list) and
one completion (the generated text) per sampled completion, and each other column of the prompt rows
(``answer`` …) as a list of the same length. It returns one number per completion (None: this
function does not score that one). :class:`Checked` turns anything else — an exception, a NaN, a
list of the wrong length — into one error naming the function and the prompt.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qfine.config import did_you_mean
from qfine.util.errors import QfineError

ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)
LENGTH_CHARS = 1000  # the length reward is 1 - characters / this, floored at 0


def text_of(completion) -> str:
    """A completion as text: TRL hands a conversational one as [{"role": "assistant", "content": …}]."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def extract_answer(text: str) -> str | None:
    """The content of the last ``<answer>…</answer>`` in ``text``, stripped; None when there is none."""
    found = ANSWER.findall(text)
    return found[-1].strip() if found else None


def _same(given: str, expected) -> bool:
    """Answers compared as numbers when both read as numbers (``7.0`` equals ``7``), else as text."""
    expected = str(expected).strip()
    try:
        return math.isclose(float(given.replace(",", "")), float(expected.replace(",", "")), rel_tol=1e-9)
    except ValueError:
        return given == expected


def answer_match(prompts, completions, answer=None, **columns) -> list[float]:
    """1 when the completion's ``<answer>`` equals the row's ``answer`` column, else 0."""
    if answer is None:
        raise QfineError("the answer_match reward needs an 'answer' column in the prompt rows")
    return [1.0 if (a := extract_answer(text_of(c))) is not None and _same(a, ans) else 0.0
            for c, ans in zip(completions, answer)]


def answer_format(prompts, completions, **columns) -> list[float]:
    """1 when the completion is exactly one ``<answer>…</answer>`` with content (whitespace around it
    allowed). One such pair among other text scores 0.25 + 0.5 · (characters of the pair / characters of
    the stripped completion), between 0.25 and 0.75: less stray text is worth more, which leads a model
    that keeps writing after its answer toward stopping there. 0.1 when it opens ``<answer>`` without a
    well-formed pair, or holds several pairs (several pairs are how this reward gets gamed); else 0."""
    out = []
    for c in completions:
        text = text_of(c)
        pairs = ANSWER.findall(text)
        if len(pairs) == 1 and pairs[0] and ANSWER.fullmatch(text.strip()):
            out.append(1.0)
        elif len(pairs) == 1 and pairs[0]:
            out.append(0.25 + 0.5 * len(ANSWER.search(text).group(0)) / len(text.strip()))
        else:
            out.append(0.1 if "<answer>" in text else 0.0)
    return out


def length(prompts, completions, **columns) -> list[float]:
    """Shorter is better: 1 - characters / 1000, floored at 0."""
    return [max(0.0, 1.0 - len(text_of(c)) / LENGTH_CHARS) for c in completions]


BUILTINS: dict[str, Callable] = {"answer_match": answer_match, "answer_format": answer_format, "length": length}


def _shown(prompt) -> str:
    if isinstance(prompt, list):
        prompt = next((m.get("content", "") for m in reversed(prompt) if m.get("role") == "user"), str(prompt))
    text = str(prompt)
    return text if len(text) <= 120 else text[:117] + "..."


class Checked:
    """A reward function whose every answer is checked: one number (or None) per completion, finite."""

    def __init__(self, name: str, fn: Callable):
        self.fn, self.__name__ = fn, name  # TRL logs rewards/<__name__>/mean

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        try:
            out = self.fn(prompts=prompts, completions=completions, **columns)
        except QfineError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's function: named, with the prompt it failed on
            raise QfineError(f"reward {self.__name__} raised {type(e).__name__}: {e} (prompt: "
                             f"{_shown(prompts[0]) if prompts else '?'!r})") from None
        try:
            out = list(out)
        except TypeError:
            raise QfineError(f"reward {self.__name__} returned {type(out).__name__}, not a list of numbers "
                             f"(prompt: {_shown(prompts[0])!r})") from None
        if len(out) != len(completions):
            raise QfineError(f"reward {self.__name__} returned {len(out)} values for {len(completions)} "
                             f"completions (prompt: {_shown(prompts[0])!r})")
        for i, v in enumerate(out):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise QfineError(f"reward {self.__name__} returned {v!r} for a completion of the prompt "
                                 f"{_shown(prompts[i])!r}: a finite number (or None) is needed")
            out[i] = float(v)
        return out


@dataclass
class Reward:
    name: str
    fn: Checked
    weight: float


def _load_user(path: Path, function: str) -> Callable:
    if not path.is_file():
        raise QfineError(f"train.rewards: reward file {path} not found")
    spec = importlib.util.spec_from_file_location(f"qfine_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: one message with its error
        raise QfineError(f"train.rewards: {path} failed to load: {type(e).__name__}: {e}") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        names = [n for n in vars(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise QfineError(f"train.rewards: {path} has no function {function!r}{did_you_mean(function, names)}")
    return fn


def parse(specs: list[str]) -> list[Reward]:
    """The rewards named by ``train.rewards`` (NAME[:WEIGHT] or FILE.py:FUNCTION[:WEIGHT])."""
    if not specs:
        raise QfineError("train.objective grpo needs train.rewards: e.g. --rewards answer_match,answer_format:0.5 "
                         f"(built-ins: {', '.join(BUILTINS)}; or your own FILE.py:FUNCTION)")
    out = []
    for spec in specs:
        if ".py:" in spec:
            file, _, rest = spec.partition(".py:")
            function, _, weight = rest.partition(":")
            name, fn = function, _load_user(Path(file + ".py"), function)
        else:
            name, _, weight = spec.partition(":")
            if name not in BUILTINS:
                raise QfineError(f"train.rewards: unknown reward {name!r}{did_you_mean(name, BUILTINS)} (built-ins: "
                                 f"{', '.join(BUILTINS)}; or your own FILE.py:FUNCTION)")
            fn = BUILTINS[name]
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise QfineError(f"train.rewards: {spec!r}: the weight after ':' must be a number") from None
        out.append(Reward(name, Checked(name, fn), w))
    return out
