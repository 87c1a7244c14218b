"""Command line: parse, build a config, call one stage. User errors exit 2 with one message.

One module per group of commands (:mod:`.train`: train, sweep, plan; :mod:`.serve`: generate, chat,
predict; :mod:`.files`: merge, export; :mod:`.evaluate`: eval; :mod:`.data`; :mod:`.demo`), each
with its ``register``. Nothing heavy is imported before the arguments are parsed: each command
imports its stage when it runs, so that ``--help`` and ``--version`` answer at once
(``bench/cli_startup.py`` measures it, ``tests/test_cli_startup.py`` checks it).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Sequence

from qfine import __version__
from qfine import config as C
from qfine.cli import data, demo, evaluate, files, serve, studio, train
from qfine.util.errors import QfineError
from qfine.util.files import write_failure


class Parser(argparse.ArgumentParser):
    """argparse with a suggestion for a mistyped flag: ``--learnig-rate`` → ``--learning-rate``,
    ``--learning_rate`` → ``--learning-rate``; every unknown flag is named at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the innermost (sub)command's parser ends up in the namespace: its flags are the ones to suggest
        self.set_defaults(_parser=self)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            sub = getattr(ns, "_parser", self)
            known = [o for o in sub._option_string_actions if o.startswith("--")]  # noqa: SLF001 - argparse's table
            flags = [a for a in extra if a.startswith("-")] or extra
            named = "; ".join(f"{a}{C.did_you_mean(a.split('=', 1)[0], known)}" for a in flags)
            sub.error(f"unknown {'flag' if len(flags) == 1 else 'flags'}: {named}")
        return ns


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qfine", description="QLoRA fine-tuning: train, use, merge, export.")
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in (train, serve, data, files, evaluate, demo, studio):
        group.register(sub)
    return parser


def _version_line() -> str:
    """qfine's version and those of the libraries it runs on (read from their metadata: nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} missing")
    return f"qfine {__version__} ({', '.join(parts)}; python {sys.version.split()[0]})"


def quiet_libraries() -> None:
    """Keep library chatter (deprecation notices, load progress bars) off the user's console. Set through
    the environment and the logging module, so that nothing is imported here."""
    import logging
    import warnings

    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", message="Merge lora module to 4-bit linear")  # we report it measured
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # imported already (qfine called from Python): the environment is read
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    ns.argv = argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Read when CUDA first allocates (after this). Growing segments in place instead of caching fixed
    # blocks: Llama-3-8B at 1x131072 reserved 55.9 GiB for 35.6 allocated with it, 66.5 without
    # (docs/benchmarks.md); the CUDA-graph tests pass under it. A user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        quiet_libraries()
        ns.func(ns)
    except QfineError as e:
        code = getattr(e, "exit_code", 2)  # a run stopped on a signal: 128 + its number
        if code == 2 or os.environ.get("RANK", "0") == "0":  # a stopped job's ranks say it once
            print(f"qfine: {'error: ' if code == 2 else ''}{e}", file=sys.stderr)
        return code
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"qfine: {ns.command} interrupted by {signal.Signals(signum).name}; no partial output was left "
              "(outputs are written under temporary names and renamed once whole)", file=sys.stderr)
        return 128 + signum
    except OSError as e:
        failure = write_failure(e, e.filename or os.getcwd(), f"qfine {ns.command}")
        if failure is None:
            raise
        print(f"qfine: error: {failure}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader (`| head`) closed the pipe: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception: the command unwinds, removing its temporary outputs, then exits 143."""

    signum = signal.SIGTERM


def _terminated(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
