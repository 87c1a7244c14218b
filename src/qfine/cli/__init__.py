"""Command line: parse, build a config, call one stage. User errors exit 2 with one message.

Nothing heavy is imported before the arguments are parsed (each command imports its stage), so that
``--help`` and ``--version`` answer at once; ``bench/cli_startup.py`` measures it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from qfine import __version__
from qfine import config as C
from qfine.models.sources import check_target
from qfine.util.errors import QfineError


def _shown(value: Any) -> str:
    """A config default as a flag would take it (lists comma-separated, dicts k=v)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(value)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field, its help taken from the field's docstring and its default shown."""
    for section in ["", *C.SECTIONS]:
        title = f"{section} options" if section else "run options"
        group = p.add_argument_group(title)
        for f in (f for f in C.flags() if f.section == section):
            dest = f"cfg:{f.section}:{f.name}"
            text = f.help if f.default is None else f"{f.help} (default: {_shown(f.default)})"
            kw: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS, help=text.replace("%", "%%"))
            if f.type is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["metavar"] = f.name.upper()
            group.add_argument(f"--{f.flag}", **kw)


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


def _overrides(ns: argparse.Namespace) -> dict[tuple[str, str], Any]:
    out = {}
    for key, value in vars(ns).items():
        if key.startswith("cfg:"):
            _, section, name = key.split(":")
            out[(section, name)] = value
    return out


def _build_config(ns: argparse.Namespace) -> C.RunConfig:
    cfg = C.load_yaml(ns.config) if ns.config else C.RunConfig()
    return C.apply_overrides(cfg, _overrides(ns))


def cmd_train(ns):
    from qfine.training import train

    cfg = _build_config(ns)
    try:
        train(cfg, overwrite=ns.overwrite, resume=ns.resume)
    except KeyboardInterrupt:
        raise QfineError(_interrupted(Path(cfg.output_dir), ns.argv)) from None


def _interrupted(run_dir: Path, argv: list[str]) -> str:
    """What a stopped training run kept, and the command that continues it."""
    from qfine.training.resume import resume_point, step_of

    ckpt, _ = resume_point(run_dir) if run_dir.is_dir() else (None, [])
    if ckpt is None:
        return "training interrupted before its first checkpoint: nothing to resume; rerun to start over"
    again = ["qfine", *(a for a in argv if a != "--overwrite")]
    if "--resume" not in again:
        again.append("--resume")
    return (f"training interrupted; the last checkpoint is {ckpt} (step {step_of(ckpt)}). "
            f"Continue with: {shlex.join(again)}")


def cmd_sweep(ns):
    from qfine.sweep import sweep

    sweep(_build_config(ns), ns.space, ns.trials, ns.timeout, ns.direction, ns.metric, ns.pruner)


def cmd_plan(ns):
    from qfine.memory.plan import parse_gib, render
    from qfine.models.sources import model_config

    cfg = _build_config(ns)
    if ns.gpu_memory:
        budget = parse_gib(ns.gpu_memory, "--gpu-memory")
    else:
        import torch

        if not torch.cuda.is_available():
            raise QfineError("no GPU visible: pass --gpu-memory (e.g. 24GiB) to plan for one")
        budget = torch.cuda.mem_get_info()[1]
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        budget = int(budget * fraction()) if fraction is not None else budget
    fused = not ns.reference_layers and cfg.lora.variant == "lora" and cfg.lora.method == "lora"
    from qfine.memory.estimate import host_available

    # this machine's host memory is the default only where the GPU's is this machine's too: planning for
    # another machine's GPU (--gpu-memory) checks the host only when told its size
    host = (parse_gib(ns.host_memory, "--host-memory") if ns.host_memory
            else None if ns.gpu_memory else host_available())
    print(render(cfg.model.source, model_config(cfg.model.source), cfg, budget, fused, host))


def _model_cfg(ns) -> C.ModelConfig | None:
    """How to load a plain model source: as written unless --quantization asks otherwise."""
    return C.ModelConfig(quantization=ns.quantization) if ns.quantization else None


def cmd_generate(ns):
    check_target(ns.target)
    from qfine.generation.serve import generate, load_for_inference

    loaded = load_for_inference(ns.target, _model_cfg(ns), task=ns.task)
    if loaded.task == "seq-cls":
        raise QfineError(f"{ns.target} is a seq-cls run: it predicts labels; use qfine predict {ns.target} --text ...")
    if loaded.task == "seq2seq":  # the prompt is the source text, no chat template
        import dataclasses

        from qfine.objectives.seq2seq import generate as generate_target

        gen = dataclasses.replace(loaded.generation, max_new_tokens=ns.max_new_tokens)
        text = generate_target(loaded.model, loaded.tokenizer, [ns.prompt], gen, loaded.data.max_seq_len)[0]
    else:
        text = generate(loaded, ns.prompt, ns.max_new_tokens, ns.temperature, ns.top_p)
    sys.stdout.write(text + "\n")


def cmd_chat(ns):
    check_target(ns.target)
    from qfine.generation.serve import chat, load_for_inference

    chat(load_for_inference(ns.target, _model_cfg(ns), task=ns.task), ns.max_new_tokens, ns.temperature, ns.top_p)


def _add_generation_flags(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("target", help="a run directory (base + adapter), or a model source (folder, .gguf, hub id, default)")
    p.add_argument("--max-new-tokens", type=int, default=max_new, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling")
    p.add_argument("--quantization", choices=["nf4", "fp4", "int8", "none"],
                   help="quantize a plain model source on load (its measured cost is printed); default: serve it as "
                        "written (a merged folder in its saved dtype, a GGUF at its file's precision; a run directory "
                        "always loads its base as trained, plus the adapter)")
    p.add_argument("--task", help="a multi-task run: the task whose adapter is active with the shared one")


# the commands that take every config field as a flag: their full usage would be 60 lines
_CONFIG_USAGE = "qfine {name} [CONFIG.yaml] [--FLAG VALUE ...]  (qfine {name} --help lists every flag)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qfine", description="QLoRA fine-tuning: train, use, merge, export.")
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", usage=_CONFIG_USAGE.format(name="train"),
                       help="fine-tune a LoRA adapter on a quantized base",
                       description="Fine-tune LoRA adapters on a quantized base. Flags override the YAML config.")
    p.add_argument("config", nargs="?", help="YAML config file (flags override its values)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", usage=_CONFIG_USAGE.format(name="sweep"),
                       help="hyperparameter search over config fields (Optuna), resumable",
                       description="Train one trial per point of the search space (--space SPACE.yaml), scoring "
                       "each on the eval data; --output-dir is the sweep directory (study, trial runs, best.yaml, "
                       "report.html). Rerun the same command to continue a killed sweep.")
    p.add_argument("config", nargs="?", help="YAML config file (flags override its values)")
    p.add_argument("--space", required=True, help="YAML: config field (section.field) → list of choices or "
                   "{low, high[, log, step]}")
    p.add_argument("--trials", type=int, default=10, help="trials to finish (completed or pruned)")
    p.add_argument("--timeout", type=float, default=0.0, help="stop starting trials after this many seconds")
    p.add_argument("--direction", choices=["minimize", "maximize"], default=None,
                   help="default: maximize for accuracy/F1/BLEU/ROUGE metrics, else minimize")
    p.add_argument("--metric", default="eval_loss", help="what the evaluation reports (eval_loss, eval_accuracy, ...)")
    p.add_argument("--pruner", choices=["median", "hyperband"], default="median")
    _add_config_flags(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plan", usage=_CONFIG_USAGE.format(name="plan"),
                       help="predicted peak GPU memory of a training config, and the settings that fit",
                       description="From the model's config.json alone (a folder holding only it works): the "
                       "predicted peak of one training step split into weights, adapter + optimizer state, "
                       "activations, loss/backward working set and slack, for each micro-batch and checkpointing "
                       "mode, fastest first, and the fastest setting that fits. The same model of memory chooses "
                       "qfine train's checkpointing when auto_memory is on.")
    p.add_argument("config", nargs="?", help="YAML config file (flags override its values)")
    p.add_argument("--gpu-memory", help="memory of the GPU to plan for, e.g. 24GiB (default: the visible GPU's)")
    p.add_argument("--host-memory", help="host memory the pinned buffers (streamed weights, offloaded checkpoints) "
                   "may use, e.g. 64GiB (default: this machine's available memory, unless --gpu-memory is given: then "
                   "not checked)")
    p.add_argument("--reference-layers", action="store_true",
                   help="plan for peft's reference layers (LoRA forms the fused GPU layers do not take)")
    _add_config_flags(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("generate", help="print the model's completion of one prompt")
    _add_generation_flags(p, 128)
    p.add_argument("--prompt", required=True, help="user message (the chat template is applied)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive streaming chat")
    _add_generation_flags(p, 256)
    p.set_defaults(func=cmd_chat)

    from qfine.cli.commands import register

    register(sub)
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
    try:
        quiet_libraries()
        ns.func(ns)
    except QfineError as e:
        print(f"qfine: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qfine: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader (`| head`) closed the pipe: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
