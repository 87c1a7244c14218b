"""``qfine train``, ``qfine sweep`` and ``qfine plan``: the commands that take every config field as a flag.

Each command imports its stage when it runs, not at the top, so that ``--help`` answers without
importing torch (``tests/test_cli_startup.py``).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from qfine import config as C
from qfine.util.errors import QfineError

# the commands that take every config field as a flag: their full usage would be 60 lines
_CONFIG_USAGE = "qfine {name} [CONFIG.yaml] [--FLAG VALUE ...]  (qfine {name} --help lists every flag)"


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
                values = C.choices(f.type)
                kw["metavar"] = "{" + ",".join(values) + "}" if values else f.name.upper()
            group.add_argument(f"--{f.flag}", **kw)


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
    from qfine.api import plan

    print(plan(_build_config(ns), ns.gpu_memory, ns.host_memory, ns.reference_layers))

def register(sub) -> None:
    """Add train, sweep and plan to the CLI's subparsers."""
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
    p.add_argument("--metric", help="what the evaluation reports (eval_loss, eval_accuracy, eval_reward, ...); default: "
                   "the objective's own (eval_reward for grpo, else eval_loss)")
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
