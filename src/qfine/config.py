"""Typed run configuration: dataclasses ← YAML file ← command-line flags.

Every field carries an attribute docstring; :func:`field_help` reads those docstrings so that
``qfine train --help`` documents each field from the one place it is defined (litgpt's style).
The resolved :class:`RunConfig` is written to ``RUN_DIR/config.yaml`` and can be run again as is.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from qfine.util.errors import QfineError


@dataclass
class ModelConfig:
    source: str = "default"
    """Base model: 'default' (bundled SmolLM2-135M-Instruct), a local Hugging Face folder, a .gguf file, or a hub id."""
    quantization: str = "nf4"
    """Storage of the frozen base weights: nf4, fp4 (4-bit bitsandbytes), int8, int4 (group-wise
    asymmetric, QA-LoRA's base: a scale and a minimum per group of input columns), adaptive (int8 for
    the layers most sensitive to 4-bit within model.memory_budget, NF4 elsewhere), or none (16/32-bit)."""
    memory_budget: str = "1.15x"
    """quantization adaptive: weight memory allowed, as a ratio to the all-NF4 model (1.15x) or in GiB (2.5GiB)."""
    int8_modules: list[str] = field(default_factory=list)
    """quantization adaptive: the linear layers kept in int8 (full names), chosen by sensitivity at the
    start of training and recorded here, so that every later load rebuilds the same model."""
    group_size: int = 32
    """int4: input columns per scale and minimum (32: GGUF Q4_1's blocks); QA-LoRA pools LoRA's input over the same groups."""
    double_quant: bool = True
    """Quantize the 4-bit absmax constants again (8-bit, blocks of 256): about 0.37 bits/param saved."""
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """dtype the 4-bit weights are dequantized to for matmuls: auto (bf16 on capable GPUs, fp16 on others, fp32 on CPU), bf16, fp16, fp32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (cuda when available, else cpu), cpu or cuda."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub model. Off unless asked for."""
    task: str = "causal-lm"
    """What the model learns: causal-lm (chat/instruction replies), seq-cls (a label per text: the base
    gets a classification head, trained in full and never quantized) or seq2seq (an encoder-decoder
    such as T5 or BART maps a source text to a target text)."""


@dataclass
class LoraSettings:
    r: int = 16
    """LoRA rank."""
    alpha: float = 32
    """LoRA alpha; the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input. 0 keeps the GPU fast path (fused layers, CUDA graphs); above 0 those
    layers run peft's reference code."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (suffixes such as q_proj) to adapt, or all-linear."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train: none, all or lora_only."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. lm_head)."""
    method: Literal["lora", "qa-lora"] = "lora"
    """lora, or qa-lora (arXiv 2309.14717: an int4 base, LoRA A over the input averaged per group, so
    `qfine merge` folds the update into the 4-bit zero points: still 4-bit, codes unchanged)."""
    trainable: list[str] = field(default_factory=list)
    """Base parts trained in full and saved (and merged) with the adapter: embed (input embeddings),
    norm (every normalisation layer), head (output layer); LongLoRA trains embed,norm."""
    variant: Literal["lora", "dora"] = "lora"
    """lora, or dora (weight-decomposed: a trained magnitude per output row times the normalised
    W + s·BA; merged exactly). DoRA layers run peft's reference code, not the fused GPU layers."""
    init: Literal["default", "gaussian", "loftq", "pissa"] = "default"
    """Adapter initialisation: default (A Kaiming-uniform, B zero: the model starts unchanged), gaussian
    (A normal), loftq (4-bit bases: A and B set from the SVD of the quantization error W − dequant(W4),
    so the model starts closer to the 16-bit one; needs the base's safetensors weights), or pissa
    (16-bit bases: A and B from the top singular vectors of W, the base keeps the rest)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r (higher ranks learn at the same pace)."""
    task_r: int = 0
    """Multi-task runs (data.task_column): the rank of each task's own adapter (0: lora.r); the shared
    adapter has lora.r."""


@dataclass
class DataConfig:
    path: str | None = None
    """Training data: .jsonl, .json, .csv, .parquet, a glob of them, a save_to_disk folder, or a hub dataset id."""
    eval_path: str | None = None
    """Separate evaluation data (same kinds as path)."""
    eval_ratio: float = 0.0
    """Fraction of the training rows held out for evaluation when no eval_path is given."""
    split: str = "train"
    """Split to read from JSON {split: rows} files, DatasetDict folders and hub datasets."""
    format: str = "auto"
    """Row format: auto (detected per row), messages, sharegpt, alpaca, dolly, qa, prompt_completion or text."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column mapping {format field: your column}, e.g. {prompt: question, completion: answer}; flag form prompt=question,completion=answer."""
    template: str = "auto"
    """Chat template: auto (the tokenizer's, ChatML if it has none), tokenizer, chatml, llama2, alpaca or qa."""
    system_prompt: str | None = None
    """System message prepended to chat rows that have none."""
    max_seq_len: int = 512
    """Sequences longer than this many tokens are truncated (or dropped, see too_long)."""
    too_long: Literal["truncate", "drop"] = "truncate"
    """What to do with examples over max_seq_len: truncate (keep the start) or drop."""
    loss_on: Literal["completion", "last_turn", "all"] = "completion"
    """Tokens that carry the loss: completion (every assistant turn + EOS), last_turn (the final assistant turn), or all."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """Unreadable or invalid rows: error (stop, naming file:line) or skip (count them and go on)."""
    packing: bool = False
    """Pack several examples per sequence (padding-free; attention never crosses examples)."""
    group_by_length: bool = False
    """Batch examples of similar length together to waste less padding."""
    streaming: bool = False
    """Read and tokenize rows lazily while training (bounded memory for huge files; needs max_steps)."""
    max_target_len: int = 128
    """seq2seq: target texts longer than this many tokens are truncated (sources follow max_seq_len)."""
    task_column: str = ""
    """Multi-task training: the column naming each row's task. One shared adapter plus one adapter per
    task are trained together, each batch holding one task (shared + its adapter active)."""
    task_weights: dict[str, float] = field(default_factory=dict)
    """Multi-task: batches per task in proportion to these weights, e.g. chat=1,facts=2 (default: as
    many as each task's rows fill)."""


@dataclass
class TrainConfig:
    objective: str = "auto"
    """What the run optimises: auto (the model head's own: sft for causal-lm, classify for seq-cls,
    seq2seq for seq2seq), or for a causal LM a preference objective: dpo, simpo or orpo on pairs
    (prompt, chosen, rejected), kto on unpaired rows (prompt, completion, true/false label); or grpo:
    reinforcement learning from rewards of sampled completions to prompts (train.rewards)."""
    beta: float = 0.0
    """Preference objectives: the strength beta (0: the objective's default: dpo 0.1, simpo 2.0, orpo 0.1
    (its lambda), kto 0.1). GRPO: the KL coefficient to the reference (the base, adapter off); 0 (its
    default) computes no reference."""
    simpo_gamma: float = 0.5
    """SimPO: the target reward margin gamma."""
    reference_logps: Literal["live", "precompute"] = "live"
    """DPO: live computes the reference's log-probabilities (the base, adapter off) in every step;
    precompute computes them once for every pair before training and stores them in the run
    (reference_logps.safetensors, which --resume reads instead of recomputing), so a step runs one
    forward instead of two."""
    group_size: int = 8
    """GRPO: completions sampled per prompt; each is scored against the mean (and spread) of its group."""
    rewards: list[str] = field(default_factory=list)
    """GRPO: the reward functions, each NAME[:WEIGHT]: a built-in (answer_match: the answer extracted from
    the completion equals the row's answer column; answer_format: the completion is exactly
    <answer>…</answer>, with partial credit for the tags among other text; length: shorter is better) or
    your own FILE.py:FUNCTION, called as f(prompts, completions, **columns) and returning one number per
    completion."""
    grpo_loss: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """GRPO: how token losses are normalised: grpo (per completion, then averaged), dr_grpo (by a fixed
    length, no per-length bias), dapo (over the tokens of the whole batch), bnpo (over the local batch's tokens)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """GRPO: divide advantages by the reward spread of the group, of the batch, or not at all (Dr. GRPO)."""
    clip_epsilon: float = 0.2
    """GRPO: the policy ratio is clipped to [1 - epsilon, 1 + epsilon]."""
    max_completion_len: int = 256
    """GRPO: the longest rollout, in tokens."""
    rollout_temperature: float = 1.0
    """GRPO: sampling temperature of the rollouts."""
    rollout_top_p: float = 1.0
    """GRPO: nucleus mass of the rollouts."""
    init_adapter: str = ""
    """A run directory or adapter folder (trained on the same base, same lora settings) the new adapter
    starts from, e.g. an SFT run before DPO; with dpo or kto that adapter, frozen, is also the reference."""
    max_steps: int = -1
    """Optimizer steps; -1 trains for `epochs` instead."""
    epochs: float = 1.0
    """Passes over the data when max_steps is -1."""
    batch_size: int = 4
    """Sequences per device per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Schedule after warmup: cosine, linear or constant."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """Decoupled weight decay on the LoRA weights."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    optimizer: str = "adamw_torch"
    """adamw_torch, or on CUDA paged_adamw_8bit / paged_adamw_32bit / adamw_8bit."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Training arithmetic: auto (on a GPU the model.compute_dtype when set, else bf16 where supported and fp16 elsewhere; fp32 on CPU), bf16, fp16, fp32 (bf16/fp16 over fp32 weights run as autocast)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass: least memory, ~25% more compute."""
    offload_checkpoints: bool = False
    """On CUDA, with gradient checkpointing (implied), keep each checkpointed layer input in pinned host
    memory instead of on the GPU (copied on a side stream, fetched back one layer ahead): the
    leanest setting, about as fast as on-GPU checkpointing at larger batches (docs/benchmarks.md)."""
    auto_memory: bool = True
    """On CUDA, predict the step's peak memory before training (qfine/memory.py) and, when the chosen
    settings would not fit the GPU's free memory, turn on gradient checkpointing, then offloaded
    checkpoints, saying what was chosen and why (never turns either off)."""
    fast_path: bool = True
    """On CUDA, swap in fused QLoRA layers and a chunked loss for Llama, Mistral, Qwen2/3 and Gemma models
    (--no-fast-path: the plain peft path). Ignored on CPU and for other models."""
    resident_weights_gib: float = 0.0
    """With the fast path on CUDA: GiB of GPU memory in which the first decoder layers' frozen 4-bit
    weights stay dequantized, so those layers skip the dequantize in every forward and backward
    (docs/benchmarks.md: the cost per layer and the speed-up). 0: dequantize every time, the least
    memory. Peak memory grows by about this much."""
    stream_weights: Literal["auto", "on", "off"] = "auto"
    """With the fast path on CUDA: keep the decoder layers' frozen weights in pinned host memory and copy
    each layer's to the GPU one layer ahead of use (forward and checkpoint recompute), so a base larger
    than the card trains (a 70B NF4 base on a 24 GiB card). auto: only when qfine's memory estimate says
    the settings do not fit otherwise (the model is then loaded on the CPU first); on; off. Implies
    gradient checkpointing; CUDA graphs stay off (docs/benchmarks.md: its cost per step)."""
    cuda_graphs: bool = True
    """With the fast path on (any precision; LoRA dropout runs inside the fused layers): pad each training micro-batch to one of 4
    lengths up to max_seq_len and replay its forward + backward as one CUDA graph after two warm-up
    steps; this removes the Python launch cost that bounds small batches (docs/benchmarks.md).
    TRL's mean_token_accuracy and entropy are then not logged."""
    s2_attn: bool = False
    """LongLoRA's shifted sparse attention while training (causal LMs): attention inside groups of
    s2_group tokens, half the heads shifted by half a group, no token seeing a later one; full
    attention in eval and generation. Pair with lora.trainable embed,norm as LongLoRA does."""
    s2_group: int = 0
    """S²-Attn group size in tokens (even); 0: a quarter of data.max_seq_len."""
    seed: int = 42
    """Random seed for LoRA initialisation, dropout and data order: the same config and seed give the
    same loss curve (bit for bit on CPU; docs/benchmarks.md gives the GPU tolerance)."""
    logging_steps: int = 1
    """Log loss, lr, grad norm and tokens/s every N steps."""
    save_steps: int = 100
    """Write a checkpoint every N steps."""
    eval_steps: int = 0
    """Evaluate on the eval data every N steps (0: at every checkpoint); also once before training."""
    load_best: bool = True
    """With eval data: keep the checkpoint with the lowest eval loss and save it as the final adapter."""
    early_stopping_patience: int = 0
    """With eval data: stop after N evaluations without eval-loss improvement (0: never)."""
    report_to: list[str] = field(default_factory=list)
    """Extra trackers passed to transformers (wandb, mlflow, ...); TensorBoard and metrics.jsonl are always written."""
    report_samples: int = 2
    """Held-out prompts answered before and after training in report.html (0: no samples)."""
    save_total_limit: int = 2
    """Checkpoints kept on disk."""


@dataclass
class GenerationSettings:
    num_beams: int = 1
    """Beams for generation (1: greedy, or sampling when --temperature > 0 where offered)."""
    length_penalty: float = 1.0
    """Beam search: > 1 favours longer outputs, < 1 shorter ones (exponent on the length)."""
    min_new_tokens: int = 0
    """Generate at least this many tokens."""
    max_new_tokens: int = 128
    """Generate at most this many tokens."""


@dataclass
class RunConfig:
    output_dir: str = "runs/qfine"
    """Run directory: adapter/, checkpoints/, metrics.jsonl, tensorboard/, config.yaml."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """How the run's model generates for report samples, eval and generate (seq2seq summaries above all)."""


SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoraSettings, "data": DataConfig, "train": TrainConfig,
                             "generation": GenerationSettings}

# Flag names: a section prefix plus the field name, with a few short names the README promises.
_FLAG_PREFIX = {"model": "", "lora": "lora-", "data": "", "train": "", "generation": ""}
_FLAG_OVERRIDE = {("model", "source"): "model", ("data", "path"): "data", ("data", "eval_path"): "eval-data",
                  ("lora", "rslora"): "rslora", ("lora", "method"): "method", ("model", "group_size"): "qa-group-size",
                  ("lora", "trainable"): "trainable"}


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Map each field of dataclass ``cls`` to the docstring written under it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
            docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
    return docs


@dataclass(frozen=True)
class Flag:
    """One command-line flag bound to ``section.name`` of a :class:`RunConfig`."""

    section: str
    name: str
    flag: str
    type: Any
    help: str
    default: Any = None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def flags() -> list[Flag]:
    """All overridable fields as flags, in declaration order."""
    out = [Flag("", "output_dir", "output-dir", str, field_help(RunConfig)["output_dir"], RunConfig.output_dir)]
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        docs = field_help(cls)
        for f in dataclasses.fields(cls):
            name = _FLAG_OVERRIDE.get((section, f.name), _FLAG_PREFIX[section] + f.name.replace("_", "-"))
            out.append(Flag(section, f.name, name, hints[f.name], docs.get(f.name, ""), _default(f)))
    return out


def did_you_mean(word: str, known) -> str:
    """`` (did you mean X?)`` for the closest of ``known`` to ``word`` (underscores read as dashes and
    the other way round), or an empty string when nothing is close."""
    import difflib

    known = list(known)
    for variant in (word, word.replace("_", "-"), word.replace("-", "_")):
        if variant in known and variant != word:
            return f" (did you mean {variant}?)"
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def allowed(cls: type, name: str) -> tuple[str, ...]:
    """The values a Literal-typed field of config section ``cls`` accepts (``allowed(LoraSettings, "variant")``)."""
    return choices(get_type_hints(cls)[name])


def choices(typ: Any) -> tuple[str, ...]:
    """A Literal type's values; () for any other type."""
    return get_args(typ) if get_origin(typ) is Literal else ()


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check/convert a YAML or flag value to the field's type; raise QfineError naming ``where``."""
    if get_origin(typ) is Literal:
        choices = get_args(typ)
        if value not in choices:
            raise QfineError(f"{where} must be one of {', '.join(choices)}, not {value!r}"
                             f"{did_you_mean(str(value), choices)}")
        return value
    origin = getattr(typ, "__origin__", None)
    args = getattr(typ, "__args__", ())
    if value is None and type(None) in args:
        return None
    if type(None) in args:  # Optional[X]
        typ = next(a for a in args if a is not type(None))
        origin, args = getattr(typ, "__origin__", None), getattr(typ, "__args__", ())
    try:
        if origin is dict:
            if isinstance(value, str):
                pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError
                value = {k.strip(): v.strip() for k, v in pairs}
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): _coerce(v, args[1], f"{where}.{k}") if args else str(v) for k, v in value.items()}
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            return [_coerce(v, args[0], where) for v in value]
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in {"true", "1", "yes", "on"}:
                return True
            if str(value).lower() in {"false", "0", "no", "off"}:
                return False
            raise ValueError
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if typ in (int, float) and isinstance(value, bool):
            raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        tname = getattr(typ, "__name__", str(typ))
        raise QfineError(f"config field '{where}': expected {tname}, got {value!r}") from None


def from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a RunConfig from nested dicts (as read from YAML); unknown keys are errors."""
    if not isinstance(data, dict):
        raise QfineError(f"{source}: expected a mapping of sections (model, lora, data, train)")
    unknown = _unknown_keys(data)
    if unknown:
        raise QfineError(f"{source}: unknown {'key' if len(unknown) == 1 else 'keys'} " + "; ".join(unknown))
    cfg = RunConfig()
    for key, value in data.items():
        if key == "output_dir":
            cfg.output_dir = _coerce(value, str, "output_dir")
            continue
        if value is None:
            continue
        if not isinstance(value, dict):
            raise QfineError(f"{source}: section '{key}' must be a mapping")
        section = getattr(cfg, key)
        hints = get_type_hints(type(section))
        for name, v in value.items():
            setattr(section, name, _coerce(v, hints[name], f"{key}.{name}"))
    return cfg


def _unknown_keys(data: dict[str, Any]) -> list[str]:
    """Every unknown section or field of ``data``, each with the closest known name when there is one."""
    out = []
    for key, value in data.items():
        if key == "output_dir":
            continue
        if key not in SECTIONS:
            where = [s for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
            hint = (f" (a field of section '{where[0]}': write it under {where[0]}:)" if where
                    else did_you_mean(key, ["output_dir", *SECTIONS]) or
                    f" (expected output_dir, {', '.join(SECTIONS)})")
            out.append(f"'{key}'{hint}")
            continue
        if isinstance(value, dict):
            known = [f.name for f in dataclasses.fields(SECTIONS[key])]
            listing = f" (known: {', '.join(known)})"
            out += [f"'{key}.{name}'{did_you_mean(str(name), known) or listing}" for name in value if name not in known]
    return out


def load_yaml(path: str | Path) -> RunConfig:
    """Read a YAML run config; a missing file or bad YAML is a QfineError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise QfineError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise QfineError(f"{path}: invalid YAML: {e}") from None
    return from_dict(data, str(path))


def apply_overrides(cfg: RunConfig, overrides: dict[tuple[str, str], Any]) -> RunConfig:
    """Set ``(section, field) -> value`` pairs (section '' for top-level fields); returns ``cfg``."""
    for (section, name), value in overrides.items():
        target = getattr(cfg, section) if section else cfg
        hints = get_type_hints(type(target))
        setattr(target, name, _coerce(value, hints[name], f"{section}.{name}" if section else name))
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Nested plain dict of the config (what config.yaml holds)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    """The fully resolved config as YAML text, re-runnable with ``qfine train config.yaml``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
