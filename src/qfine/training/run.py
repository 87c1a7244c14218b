"""The training recipe: check → load → adapt → data → train → save, in one readable function.

Run directory layout::

    RUN_DIR/config.yaml      fully resolved config (re-runnable)
    RUN_DIR/adapter/         PEFT adapter + tokenizer (written atomically at the end)
    RUN_DIR/checkpoints/     trainer checkpoints (for --resume)
    RUN_DIR/metrics.jsonl    one line per log event
    RUN_DIR/tensorboard/     TensorBoard events
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .. import config as C
from .. import s2attn
from ..adapters import add_lora, check_init_for_base, check_lora_settings
from ..data import build_datasets
from ..data.readers import expand
from ..errors import QfineError
from ..fast import enable_fast_path, keep_dequantized, offload_checkpoints, release_dequantized
from ..fsutil import atomic_dir, atomic_write_text
from ..loading import describe, load_model, load_tokenizer, resolve_device, resolve_source
from ..loftq import start_loftq
from .resume import (DATA_RECORD, check_resume_config, check_resume_data, data_record, finished_adapter,
                     load_checkpoint_adapter, resume_point, step_of, truncate_metrics, write_data_record)
from .. import distributed
from ..tasks import task_spec
from . import multitask
from ..tasks.classify import build_datasets as classify_datasets, dataset_scores, label_set, save_labels
from ..tasks.seq2seq import build_datasets as seq2seq_datasets, safe_precision
from .progress import outcome, summary
from .samples import Samples
from .trainer import build_trainer, check_train_config, resolve_precision


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole ``checkpoint-N`` folder under ``run_dir/checkpoints``, if any."""
    return resume_point(run_dir)[0]


def check_run_dir(cfg: C.RunConfig, overwrite: bool, resume: bool) -> tuple[Path, Path | None, list[str]]:
    """Apply the run-directory rules without touching anything.

    Returns ``(run_dir, checkpoint to resume from or None, lines to print)``. An existing non-empty
    directory is never reused silently: ``--resume`` continues it from its newest whole checkpoint
    (newer half-written ones are skipped and named) if the config still describes the same run,
    ``--overwrite`` replaces it (only if it is a qfine run), anything else is an error.
    """
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise QfineError(f"output dir {run_dir} exists and is not a directory")
    used = run_dir.is_dir() and any(run_dir.iterdir())
    if resume and overwrite:
        raise QfineError("--resume and --overwrite contradict each other; pass one")
    if resume:
        ckpt, notes = resume_point(run_dir) if used else (None, [])
        if ckpt is None:
            why = f" ({'; '.join(notes)})" if notes else ""
            raise QfineError(f"--resume: no whole checkpoint to resume from in {run_dir / 'checkpoints'}{why}")
        changed = check_resume_config(run_dir, cfg)
        notes.append(f"resuming from {ckpt} (step {step_of(ckpt)})" +
                     (f"; changed: {'; '.join(changed)}" if changed else ""))
        return run_dir, ckpt, notes
    if used:
        if not overwrite:
            what = "a previous qfine run" if (run_dir / "config.yaml").exists() else "other files"
            raise QfineError(f"output dir {run_dir} already holds {what}; pass --overwrite to replace it "
                             "or --resume to continue it")
        if not (run_dir / "config.yaml").exists() and not (run_dir / "adapter").exists():
            raise QfineError(f"output dir {run_dir} is not a qfine run; refusing to delete it even with --overwrite")
    return run_dir, None, []


def start_run_dir(run_dir: Path, resume: bool) -> None:
    """Empty (unless resuming) and create the run directory checked by :func:`check_run_dir`."""
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def save_adapter(model, tokenizer, out: Path, base_source: str) -> None:
    """Write the PEFT adapter + tokenizer to ``out`` atomically, naming ``base_source`` as its base."""
    for peft_cfg in model.peft_config.values():
        peft_cfg.base_model_name_or_path = base_source
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _choose_int8_layers(cfg: C.RunConfig):
    """Adaptive quantization's choice (:func:`qfine.adaptive.select`) on the first 16 training rows."""
    import dataclasses
    import itertools

    import torch

    from ..adaptive import select
    from ..loading import load_tokenizer, resolve_source

    if cfg.model.task != "causal-lm":
        raise QfineError(f"model.quantization adaptive serves causal LMs for now, not model.task {cfg.model.task}")
    tok = load_tokenizer(resolve_source(cfg.model.source), cfg.model.trust_remote_code)
    stream = dataclasses.replace(cfg.data, streaming=True, eval_ratio=0.0, eval_path=None)
    rows = list(itertools.islice(build_datasets(tok, stream, cfg.train.seed)[0], 16))
    return select(cfg.model, [torch.tensor([r["input_ids"]]) for r in rows])


def _model_and_data(cfg: C.RunConfig, base_cache: dict | None = None, stage_on_cpu: bool = False):
    """Load the model of ``cfg.model.task`` and tokenize its data →
    ``(loaded, train_ds, eval_ds, data line, labels or None)``. A seq-cls label set is read from the
    training rows first: the model's head is built with one output per label. With ``base_cache`` (a
    dict kept by the caller across runs, e.g. a sweep's trials) a base loaded with the same model
    settings is reused instead of loaded again."""
    task = task_spec(cfg.model.task).name
    labels = label_set(cfg.data) if task == "seq-cls" else None
    key = (repr(cfg.model), tuple(labels or ()), stage_on_cpu)
    cached = base_cache["loaded"] if base_cache is not None and base_cache.get("key") == key else None
    source = resolve_source(cfg.model.source)
    # the data are read, checked and tokenized before the weights load: a bad row fails in seconds
    tok = cached.tokenizer if cached is not None else load_tokenizer(source, cfg.model.trust_remote_code)
    note = check_context(cfg, source)
    if note:
        print(f"[qfine] {note}", flush=True)
    if task == "causal-lm":
        train_ds, eval_ds, stats = build_datasets(tok, cfg.data, cfg.train.seed)
    else:
        build = classify_datasets if task == "seq-cls" else seq2seq_datasets
        train_ds, eval_ds, stats = (build(tok, cfg.data, labels, cfg.train.seed) if labels else
                                    build(tok, cfg.data, cfg.train.seed))
    loaded = cached
    if loaded is None:
        loaded = load_model(cfg.model, labels, stage_on_cpu=stage_on_cpu, tokenizer=tok)
        if base_cache is not None:
            base_cache.update(key=key, loaded=loaded)
    if cfg.data.streaming:
        return loaded, train_ds, eval_ds, f"data: streaming {cfg.data.path}", labels
    held = f", {len(eval_ds)} held out for eval" if eval_ds is not None and not cfg.data.eval_path else ""
    line = (f"data: {stats.rows} rows ({stats.tokens} tokens){held}; {stats.truncated} truncated to "
            f"{cfg.data.max_seq_len}, {getattr(stats, 'dropped', 0)} dropped, {stats.skipped} bad rows skipped"
            + (f", {stats.no_target} with no token to predict left out" if getattr(stats, "no_target", 0) else ""))
    if labels:
        line += f"; labels: {', '.join(labels)}"
    return loaded, train_ds, eval_ds, line, labels


def check_context(cfg: C.RunConfig, source: str) -> str | None:
    """Bound data.max_seq_len by the model's context (max_position_embeddings in its config.json):
    positions past it were never trained. A length the user set is refused; the default (512) is
    lowered to the context, and the returned line says so."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return None  # load_model names what is wrong with the folder
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or cfg.data.max_seq_len <= limit:
        return None
    if cfg.data.max_seq_len == C.DataConfig().max_seq_len:
        cfg.data.max_seq_len = limit
        return f"data.max_seq_len lowered from the default 512 to the model's context of {limit} tokens"
    raise QfineError(f"data.max_seq_len {cfg.data.max_seq_len} is longer than the model's context of {limit:,} "
                     f"tokens (max_position_embeddings in {cfg.model.source}'s config.json); lower --max-seq-len")


def _budget() -> int:
    """Bytes this process may use on its GPU: free + already allocated, under a per-process cap if set."""
    import torch

    free, total = torch.cuda.mem_get_info()
    budget = free + torch.cuda.memory_allocated()  # the loaded weights are part of the estimate
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:  # torch.cuda.set_per_process_memory_fraction caps this process below the card
        budget = min(budget, int(fraction() * total))
    return budget


def choose_streaming(cfg: C.RunConfig, device: str) -> tuple[bool, int, str | None]:
    """Whether to stream the frozen weights (``train.stream_weights``), decided before the model is loaded
    (a streamed base is loaded on the CPU first): (stream, how many of the last decoder layers keep their
    weights on the GPU, a line saying why or None). With ``auto``, the layers that fit beside the
    streamed estimate stay on the GPU (fewer copies per step: docs/benchmarks.md); ``on`` streams all."""
    from .. import memory, plan

    t = cfg.train
    if t.stream_weights == "off":
        return False, 0, None
    refusal = None
    if device != "cuda":
        refusal = f"nothing to stream from on {device}"
    elif cfg.model.quantization not in ("nf4", "fp4"):
        refusal = f"it serves 4-bit bases (model.quantization nf4 or fp4), not {cfg.model.quantization}"
    elif not t.fast_path or cfg.model.task != "causal-lm":
        refusal = "it runs inside the fast path's fused layers (causal LMs, train.fast_path on)"
    elif distributed.world_size() > 1:
        refusal = "it has not been tested under several ranks"
    if refusal:
        if t.stream_weights == "on":
            if device != "cuda":
                return False, 0, f"stream_weights: {refusal}; the weights stay where they are"
            raise QfineError(f"train.stream_weights on: {refusal}")
        return False, 0, None
    if t.stream_weights == "on":
        if (short := _host_shortfall(_streamed_host_bytes(cfg), "streamed weights")) is not None:
            raise QfineError(f"train.stream_weights on: {short}")
        return True, 0, "weight streaming on (train.stream_weights)"
    if t.resident_weights_gib > 0:
        return False, 0, None
    try:
        config = plan.load_config(cfg.model.source)
        shapes = memory.Shapes.from_config(config)
    except Exception:  # noqa: BLE001 - the estimate is optional: without a readable decoder-only config, no streaming
        return False, 0, None
    budget = _budget()
    weights = plan.weight_bytes(config, cfg.model.quantization, cfg.model.double_quant, cfg.model.group_size)
    params = plan.trainable_params(config, cfg)
    tokens = t.batch_size * cfg.data.max_seq_len
    dropout = cfg.lora.dropout > 0
    mode, est = memory.fitting_mode(shapes, tokens, budget, weights, params, t.optimizer, True, dropout=dropout)
    if mode is not None:
        return False, 0, None
    per_layer = plan.layer_bytes(config, cfg.model.quantization, cfg.model.double_quant, cfg.model.group_size)
    streamed = {m: memory.estimate(shapes, tokens, m, weights, params, t.optimizer, True, dropout=dropout,
                                   layer_bytes=per_layer) for m in ("checkpoint", "offload")}
    mode = "offload" if t.offload_checkpoints else "checkpoint"
    if streamed[mode].total > memory.FILL * budget:
        mode = "offload"  # auto_memory turns it on after loading, by the same estimate
    if streamed[mode].total > memory.FILL * budget:
        return False, 0, None  # streaming would not fit either: the load-time estimate below says so
    # one layer of margin; never all of them (that would be no streaming at all)
    spare = int((memory.FILL * budget - streamed[mode].total) // per_layer) - 1
    keep = max(0, min(spare, shapes.layers - memory.STREAM_WINDOW))
    host = (shapes.layers - keep) * plan.host_layer_bytes(config, cfg.model.quantization, cfg.model.double_quant)
    if (short := _host_shortfall(host, "streamed weights")) is not None:
        return False, 0, f"weight streaming off: {short}"
    return True, keep, (f"weight streaming on: {est['offload'].total / memory.GIB:.1f} GiB with every weight on "
                        f"the GPU is more than {memory.FILL:.0%} of the {budget / memory.GIB:.1f} GiB free; streamed: "
                        f"{streamed[mode].line()}; the last {keep} of {shapes.layers} layers keep their weights on "
                        "the GPU (train.stream_weights: off keeps them all there)")


def _host_shortfall(need: int, what: str) -> str | None:
    """A sentence when ``need`` bytes of pinned host memory are more than this host has available now
    (pinned memory cannot be swapped out: the allocation would fail mid-run); None when they fit or the
    host's memory cannot be read."""
    from .. import memory

    have = memory.host_available()
    if have is None or need <= have:
        return None

    def size(n: int) -> str:
        return f"{n / memory.GIB:.1f} GiB" if max(need, have) >= memory.GIB else f"{n / 2**20:.1f} MiB"

    return f"the {what} need {size(need)} of pinned host memory and this machine has {size(have)} available"


def _streamed_host_bytes(cfg: C.RunConfig) -> int:
    """Pinned host bytes of every decoder layer's streamed weights, from the config (0 if unreadable)."""
    from .. import memory, plan

    try:
        config = plan.load_config(cfg.model.source)
        layers = memory.Shapes.from_config(config).layers
    except Exception:  # noqa: BLE001 - only a check: the load itself reports an unreadable model
        return 0
    return layers * plan.host_layer_bytes(config, cfg.model.quantization, cfg.model.double_quant)


def check_offload_host(model, cfg: C.RunConfig) -> None:
    """Refuse offloaded checkpoints whose layer inputs (one per decoder layer, batch × sequence × hidden
    in the compute dtype) would not fit the host's available memory."""
    from .. import memory

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        shapes = memory.Shapes.from_config(lm.config)
    except (AttributeError, TypeError):
        return
    need = memory.offload_host_bytes(shapes, cfg.train.batch_size * cfg.data.max_seq_len)
    if (short := _host_shortfall(need, f"offloaded checkpoints ({shapes.layers} layer inputs)")) is not None:
        raise QfineError(f"{short}: lower data.max_seq_len or train.batch_size, or keep the checkpoints on the "
                         "GPU (train.offload_checkpoints: false, train.auto_memory: false)")


def _stream_weights(model, fast, device: str, keep_last: int = 0) -> int:
    """Install weight streaming on the adapted model (placing the rest of it on the GPU); returns the
    bytes of the layers' device copies at once, for the memory estimate."""
    from .. import memory
    from ..fast import stream as weight_stream

    if fast is None or fast.fused != fast.layers or not fast.layers:
        why = fast.reason if fast is not None and fast.reason else "some decoder layers run peft's reference layer"
        raise QfineError(f"train.stream_weights: the weights stream inside the fused layers, and {why}")
    ws = weight_stream.install(model, device, keep_last=keep_last)
    count = sum(1 for slots in ws.slots if slots)  # the streamed layers
    per_layer = ws.streamed_bytes // max(1, count)
    size = (f"{ws.streamed_bytes / memory.GIB:.2f} GiB" if ws.streamed_bytes >= memory.GIB // 10
            else f"{ws.streamed_bytes / 2**20:.2f} MiB")
    print(f"[qfine] weight streaming: {size} of frozen weights of {count} of {len(ws.layers)} decoder layers in "
          "pinned host memory, each layer's copied to the GPU one layer ahead of use", flush=True)
    return memory.STREAM_WINDOW * per_layer


def fit_memory(model, cfg: C.RunConfig, fast, offload: bool, streamed_window: int = 0) -> tuple[str, bool]:
    """Predict the step's peak (:mod:`qfine.memory`) and turn on checkpointing, then offloading, when it
    would not fit the GPU's free memory; returns (a line saying what and why, whether to offload).
    Records the choice in ``cfg.train`` so the run's config.yaml says how it trained.
    ``streamed_window``: bytes of the streamed layers' device copies at once (0: no streaming)."""
    import torch

    from .. import memory

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        shapes = memory.Shapes.from_config(lm.config)
    except (AttributeError, TypeError):
        return "memory estimate: skipped (not a decoder-only config)", offload
    budget = _budget()
    weights = torch.cuda.memory_allocated() + int(cfg.train.resident_weights_gib * memory.GIB) + streamed_window
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = cfg.train.batch_size * cfg.data.max_seq_len
    current = "offload" if offload else ("checkpoint" if cfg.train.gradient_checkpointing else "none")
    fused = fast is not None and fast.layers > 0 and fast.fused == fast.layers
    mode, est = memory.fitting_mode(shapes, tokens, budget, weights, trainable, cfg.train.optimizer, fused,
                                    at_least=current, dropout=cfg.lora.dropout > 0)
    gib = budget / memory.GIB
    warning = ""
    if mode is None:  # the leanest mode gives the best chance; say that it may still not fit
        mode = list(est)[-1]
        warning = (f"; even that is more than {memory.FILL:.0%} of the {gib:.1f} GiB free, so training may run out "
                   "of memory (lower train.batch_size or data.max_seq_len)")
    if mode == current:
        return (f"memory estimate: {est[mode].line()}" + (warning or f"; fits the {gib:.1f} GiB free")), offload
    enable_checkpointing(model, fused_layers=fast is not None and fast.layers > 0)
    cfg.train.gradient_checkpointing = True
    if mode == "offload":
        cfg.train.offload_checkpoints = True
    why = f"{est[current].total / memory.GIB:.1f} GiB without would not fit the {gib:.1f} GiB free"
    return (f"memory: {'offloaded' if mode == 'offload' else 'gradient'} checkpointing turned on — {why}; "
            f"now {est[mode].line()}{warning} (train.auto_memory: false keeps the settings as given)"), mode == "offload"


def enable_checkpointing(model, fused_layers: bool) -> None:
    """Gradient checkpointing on an adapted model (as :func:`qfine.add_lora` sets it up); where the fast
    path swapped the layers, through its recompute (as :func:`qfine.fast.apply_fast_path` installs it)."""
    from ..adapters import enable_checkpointing as enable
    from ..fast import install_checkpointing
    from ..fast.swap import causal_lm

    enable(model)
    if fused_layers:
        install_checkpointing(causal_lm(model).model.layers, offload=False)


def release_adapter(base_cache: dict) -> None:
    """Take the last run's adapter out of the cached base (peft's ``unload``: the original modules go
    back in place, unmerged), so the next run adds a fresh one to the same frozen weights."""
    import gc

    model = base_cache.pop("adapted", None)
    if model is not None:
        model.unload()
    gc.collect()


def train(cfg: C.RunConfig, overwrite: bool = False, resume: bool = False, callbacks=(),
          base_cache: dict | None = None) -> Path:
    """Fine-tune per ``cfg``; returns the run directory (adapter in ``RUN_DIR/adapter``). With
    ``base_cache`` the frozen base is loaded once across calls (see :func:`_model_and_data`); the caller
    takes each run's adapter out again with :func:`release_adapter`."""
    from transformers import TrainerState

    from .callbacks import NonFiniteError
    from .report import ReportFacts, render

    if not cfg.data.path:
        raise QfineError("no training data: pass --data FILE or set data.path in the config")
    device = resolve_device(cfg.model.device)
    distributed.start(device)
    check_train_config(cfg, device)
    check_lora_settings(cfg.lora)
    if cfg.lora.method == "qa-lora":
        if cfg.model.quantization == "nf4":  # the default: QA-LoRA brings its own base
            cfg.model.quantization = "int4"
            print(f"[qfine] qa-lora: base quantized to int4, groups of {cfg.model.group_size} input columns", flush=True)
        elif cfg.model.quantization != "int4":
            raise QfineError(f"lora.method qa-lora trains over an int4 base, not model.quantization "
                             f"{cfg.model.quantization}")
    check_init_for_base(cfg.lora, cfg.model.quantization)
    if cfg.data.streaming and cfg.train.max_steps <= 0:
        raise QfineError("data.streaming needs train.max_steps (a stream has no known length for epochs)")
    expand(cfg.data.path)  # a missing file or empty glob fails before anything is loaded
    run_dir, ckpt, notes = check_run_dir(cfg, overwrite, resume)
    for line in notes:
        print(f"[qfine] {line}", flush=True)

    # Everything that can fail on user input (model, data, targets) runs before the run dir is touched.
    sensitivity = None
    if cfg.model.quantization == "adaptive" and not cfg.model.int8_modules:
        cfg.model.int8_modules, layers, line = _choose_int8_layers(cfg)
        print(f"[qfine] {line}", flush=True)
        sensitivity = (line, layers)
    if cfg.data.task_column:
        multitask.check_config(cfg, resume)
    stream, keep, line = choose_streaming(cfg, device)
    if line:
        print(f"[qfine] {line}", flush=True)
    if stream:
        cfg.train.stream_weights = "on"  # the run's config.yaml says how it trained
        cfg.train.gradient_checkpointing = True
    loaded, train_ds, eval_ds, data_line, labels = _model_and_data(cfg, base_cache, stage_on_cpu=stream)
    tokenizer = loaded.tokenizer
    tasks = None
    if cfg.data.task_column:
        tasks, train_ds, line = multitask.with_task_ids(train_ds, cfg)
        data_line += f"; {line}"
    print(f"[qfine] {data_line}", flush=True)
    if cfg.model.task == "seq2seq":
        import torch

        bf16_ok = device == "cuda" and torch.cuda.is_bf16_supported()
        precision = resolve_precision(cfg.train.precision, device, cfg.model.compute_dtype)
        cfg.train.precision, why = safe_precision(precision, loaded.model.config.model_type, bf16_ok)
        if why:
            print(f"[qfine] {why}", flush=True)
    data = data_record(train_ds)
    if ckpt is not None:
        check_resume_data(run_dir, data, cfg.data.path)

    offload = cfg.train.offload_checkpoints
    model = add_lora(loaded.model, cfg.lora, cfg.train.gradient_checkpointing or offload, seed=cfg.train.seed,
                     task_type=task_spec(cfg.model.task).peft_type,
                     adapter_name=multitask.SHARED if tasks else "default")
    if tasks:
        for line in multitask.add_task_adapters(model, cfg.lora, tasks, cfg.lora.task_r, cfg.train.seed):
            print(f"[qfine] {line}", flush=True)
    if base_cache is not None:
        base_cache["adapted"] = model
    if cfg.lora.init == "loftq" and ckpt is None:  # a resumed run reads its adapter from the checkpoint
        print(f"[qfine] {start_loftq(model, loaded.source)}", flush=True)
    fast = None
    if cfg.train.fast_path and cfg.model.task == "causal-lm":
        fast = enable_fast_path(model, device)
    elif cfg.train.fast_path and device == "cuda":
        print(f"[qfine] fast path off: the fused layers serve causal LMs, not model.task {cfg.model.task}", flush=True)
    if fast is not None:
        print(f"[qfine] {fast}", flush=True)
    window = 0
    if stream:
        window = _stream_weights(model, fast, device, keep)
    if cfg.train.auto_memory and device == "cuda":
        line, offload = fit_memory(model, cfg, fast, offload, window)
        print(f"[qfine] {line}", flush=True)
    if offload and device == "cuda":
        check_offload_host(model, cfg)
        print(f"[qfine] checkpointed inputs of {offload_checkpoints(model)} layers kept in pinned host memory",
              flush=True)
    elif offload:
        print(f"[qfine] offload_checkpoints: nothing to offload to on {device}; plain gradient checkpointing",
              flush=True)
    footprint = f"{cfg.model.source} ({cfg.model.quantization}) on {device}: {describe(model)}"
    print(f"[qfine] {footprint}", flush=True)
    samples = Samples(cfg, labels)
    main = distributed.is_main()  # a launched job's other ranks train and write nothing
    if main and samples.inputs:
        print(f"[qfine] report samples: answering {len(samples.inputs)} held-out inputs before training", flush=True)
    before = samples.answers(model, tokenizer, device) if main else []
    distributed.barrier()  # every rank has checked the run directory before rank 0 empties it
    resume_step = step_of(ckpt) if ckpt is not None else None
    if main:
        start_run_dir(run_dir, resume)
        atomic_write_text(run_dir / "config.yaml", C.to_yaml(cfg))
        if labels:
            save_labels(run_dir, labels)
        if ckpt is None or not (run_dir / DATA_RECORD).is_file():
            write_data_record(run_dir, data)
        if resume_step is not None:
            truncate_metrics(run_dir / "metrics.jsonl", resume_step)  # the resumed run logs later steps again
    distributed.barrier()

    # the whole tree in training mode: from_pretrained leaves the inner model in eval mode while the
    # freshly built peft wrappers start in training mode, and Trainer only calls train() on a model whose
    # top-level flag is off — the fused layers, the fused loss and LoRA dropout all read the inner flags
    model.train()
    if cfg.train.s2_attn:
        group = cfg.train.s2_group or cfg.data.max_seq_len // 4
        print(f"[qfine] S²-Attn in training: {s2attn.enable(model, group)} attention layers, groups of {group} "
              f"tokens, half the heads shifted by {group // 2}; full attention in eval and generation", flush=True)
    trainer = build_trainer(model, tokenizer, train_ds, eval_ds, cfg, run_dir, device, callbacks, resume_step)
    if tasks:
        trainer.task_names, trainer.task_weights = tasks, dict(cfg.data.task_weights)
        if cfg.train.cuda_graphs and device == "cuda":
            print("[qfine] CUDA graphs off: each multi-task batch switches the active adapters", flush=True)
    elif cfg.train.cuda_graphs and fast is not None and fast.layers and distributed.world_size() > 1:
        print("[qfine] CUDA graphs off: not tested under DDP (several ranks); the fused layers still run", flush=True)
    elif cfg.train.cuda_graphs and fast is not None and fast.layers:
        print(f"[qfine] {trainer.enable_cuda_graphs(cfg.data.max_seq_len)}", flush=True)
    facts = ReportFacts(title=f"qfine run · {run_dir.name}", model=f"{cfg.model.source} · {cfg.model.quantization}",
                        device=device, footprint=footprint, data=data_line, config_yaml=C.to_yaml(cfg),
                        samples_note=samples.note, sensitivity=sensitivity)
    if fast is not None and fast.layers and cfg.train.resident_weights_gib > 0:
        dtype = model.get_input_embeddings().weight.dtype  # the dtype the fused layers compute in
        n, gib = keep_dequantized(model, cfg.train.resident_weights_gib, dtype)
        print(f"[qfine] resident weights: {n} of {fast.layers} layers kept dequantized ({gib:.2f} GiB of "
              f"{cfg.train.resident_weights_gib:g})", flush=True)
    started = time.perf_counter()
    try:
        if resume_step is not None and 0 < cfg.train.max_steps <= resume_step:
            # killed after its last checkpoint: Trainer would run one more step before it checks the limit
            done = finished_adapter(ckpt, cfg.train.load_best)
            load_checkpoint_adapter(model, done)
            trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
            print(f"[qfine] {ckpt.name} is the run's last step: nothing left to train; the adapter comes from "
                  f"{done.name}", flush=True)
        else:
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    except NonFiniteError as e:
        good = last_checkpoint(run_dir)
        facts.status = f"stopped: {e}"
        if main:
            atomic_write_text(run_dir / "report.html", render(run_dir, facts))
        raise QfineError(f"training stopped: {e}. No adapter was saved from the bad step; the last good checkpoint "
                         f"is {good or 'none (no checkpoint was written yet)'}, untouched. Lower the learning rate or "
                         "check the data, then --resume or start over.") from None
    finally:
        release_dequantized(model)
        s2attn.disable(model)
    if getattr(trainer, "graphed", None) is not None:
        print(f"[qfine] {trainer.graphed.summary()}", flush=True)
    if tasks:  # the report's samples and anything after training see shared + the first task
        multitask.activate(model, tasks, tasks[0])
    if not main:
        distributed.barrier()  # rank 0 writes the adapter and the report
        return run_dir
    save_adapter(model, tokenizer, run_dir / "adapter", loaded.source)
    ended = outcome(trainer.state, time.perf_counter() - started, load_best=eval_ds is not None and cfg.train.load_best)
    facts.adapter = f"step {ended.adapter_step} ({ended.adapter_why})"
    if samples.inputs:
        print(f"[qfine] report samples: answering the {len(samples.inputs)} inputs with the trained adapter", flush=True)
    facts.samples = list(zip(samples.shown(), before, samples.answers(model, tokenizer, device)))
    if labels and eval_ds is not None:
        facts.confusion = (labels, dataset_scores(model, tokenizer, eval_ds, len(labels))["confusion"])
    atomic_write_text(run_dir / "report.html", render(run_dir, facts))
    prompt = samples.shown()[0] if samples.inputs and cfg.model.task == "causal-lm" else None
    for line in summary(ended, run_dir, prompt):
        print(f"[qfine] {line}", flush=True)
    distributed.barrier()
    return run_dir
