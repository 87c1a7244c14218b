"""``qfine train``: the training recipe as named phases.

    check → open the run → decide → load → adapt → fit memory → start the run → fit → finish

Each phase is a function of what it needs. What the run decides for itself is a record
(:class:`qfine.training.decide.Decisions`); the run trains with the caller's config with those
decisions applied to a copy, and that copy is what config.yaml records. What differs per training
objective comes from the run's :class:`~qfine.objectives.base.Objective`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerState

from qfine import config as C
from qfine.compat.torch import shutdown_workers
from qfine.data.readers import expand
from qfine.fast import (
    FastPathReport,
    enable_fast_path,
    install_checkpointing,
    keep_dequantized,
    offload_checkpoints,
    release_dequantized,
)
from qfine.fast import stream as weight_stream
from qfine.fast.swap import causal_lm
from qfine.memory import disk
from qfine.memory import estimate as memory
from qfine.memory import fit as memory_fit
from qfine.methods import s2attn
from qfine.methods.loftq import start_loftq
from qfine.methods.lora import add_lora, check_lora_settings, start_from
from qfine.methods.lora import enable_checkpointing as enable_plain_checkpointing
from qfine.methods.multitask import SHARED, activate, add_task_adapters
from qfine.models.heads import head_of, save_labels
from qfine.models.loading import Loaded, count_parameters, describe, load_model, load_tokenizer, resolve_device
from qfine.models.sources import resolve_source
from qfine.objectives import multitask, objective_of
from qfine.objectives.base import Objective
from qfine.objectives.classify import dataset_scores
from qfine.objectives.common import resolve_precision
from qfine.training.callbacks import NonFiniteError
from qfine.training.decide import Decisions, decide, settle
from qfine.training.progress import outcome, summary
from qfine.training.report import ReportFacts, render
from qfine.training.resume import (
    DATA_RECORD,
    check_resume_data,
    data_record,
    finished_adapter,
    load_checkpoint_adapter,
    step_of,
    truncate_metrics,
    write_data_record,
)
from qfine.training.rundir import (
    check_run_dir,
    drop_partial_checkpoints,
    last_checkpoint,
    save_adapter,
    start_run_dir,
)
from qfine.training.samples import Samples
from qfine.training.stop import StopAtStep, Stopped, StopRequest, check_stop, signals_stop
from qfine.training.trainer import build_trainer, check_train_config
from qfine.util import distributed, lock
from qfine.util.errors import QfineError
from qfine.util.files import atomic_write_text, thread_write_failures, write_failure
from qfine.util.log import say
from qfine.util.runstate import read_status, write_status


class BaseCache:
    """A frozen base loaded once and reused by several runs in one process (a sweep's trials).

    :meth:`loaded` hands out the base when the model settings are the ones it was loaded with; each
    run adds its adapter to it, and :meth:`release_adapter` takes that adapter out again afterwards.
    """

    def __init__(self):
        self._key: tuple | None = None
        self._loaded: Loaded | None = None
        self.adapted = None  # the last run's peft model over the cached base

    def loaded(self, key: tuple) -> Loaded | None:
        return self._loaded if key == self._key else None

    def keep(self, key: tuple, loaded: Loaded) -> None:
        self._key, self._loaded = key, loaded

    def release_adapter(self) -> None:
        """Take the last run's adapter out of the cached base (peft's ``unload``: the original modules
        go back in place, unmerged), so the next run adds a fresh one to the same frozen weights."""
        if self.adapted is not None:
            self.adapted.unload()
        self.adapted = None
        gc.collect()


@dataclass
class Prepared:
    """The loaded base and the run's tokenized data."""

    loaded: Loaded
    train_ds: object
    eval_ds: object
    data_line: str  # what the data phase says about the rows
    labels: list[str] | None
    tasks: list[str] | None  # a multi-task run's task names


@dataclass
class Started:
    """What :func:`start` set up for :func:`fit` and :func:`finish`."""

    trainer: object
    facts: ReportFacts
    samples: Samples
    before: list[str]  # the samples' answers before training
    s2: s2attn.S2Attn | None  # S²-Attn while training, switched off after it


# ---- the phases ---------------------------------------------------------------------------------

def check(cfg: C.RunConfig, objective: Objective) -> str:
    """Settings that can be refused before anything is loaded; returns the device (cuda or cpu) and
    joins a launched job's process group."""
    if not cfg.data.path:
        raise QfineError("no training data: pass --data FILE or set data.path in the config")
    device = resolve_device(cfg.model.device)
    distributed.start(device)
    check_train_config(cfg, device, objective)
    check_lora_settings(cfg.lora)
    if cfg.data.streaming and cfg.train.max_steps <= 0:
        raise QfineError("data.streaming needs train.max_steps (a stream has no known length for epochs)")
    expand(cfg.data.path)  # a missing file or empty glob fails before anything is loaded
    return device


def load(cfg: C.RunConfig, objective: Objective, stage_on_cpu: bool, cache: BaseCache | None) -> Prepared:
    """Tokenize the data, then load the base (so a bad row fails in seconds, not after the weights).
    A labelled head's classes are read from the training rows first: the head gets one output each."""
    labels = objective.labels(cfg)
    key = (repr(cfg.model), tuple(labels or ()), stage_on_cpu)
    cached = cache.loaded(key) if cache is not None else None
    tok = cached.tokenizer if cached is not None else load_tokenizer(resolve_source(cfg.model.source),
                                                                   cfg.model.trust_remote_code)
    train_ds, eval_ds, stats = objective.datasets(tok, cfg, labels)
    loaded = cached or load_model(cfg.model, labels, stage_on_cpu=stage_on_cpu, tokenizer=tok)
    if cache is not None:
        cache.keep(key, loaded)
    if cfg.data.streaming:
        line = f"data: streaming {cfg.data.path}"
    else:
        held = f", {len(eval_ds)} held out for eval" if eval_ds is not None and not cfg.data.eval_path else ""
        line = (f"data: {stats.rows} rows ({stats.tokens} tokens){held}; {stats.truncated} truncated to "
                f"{cfg.data.max_seq_len}, {getattr(stats, 'dropped', 0)} dropped, {stats.skipped} bad rows skipped"
                + (f", {stats.no_target} with no token to predict left out" if getattr(stats, "no_target", 0) else ""))
    if labels:
        line += f"; labels: {', '.join(labels)}"
    tasks = None
    if cfg.data.task_column:
        tasks, train_ds, task_line = multitask.with_task_ids(train_ds, cfg)
        line += f"; {task_line}"
    return Prepared(loaded, train_ds, eval_ds, line, labels, tasks)


def adapt(cfg: C.RunConfig, objective: Objective, prep: Prepared, device: str, fresh: bool,
          cache: BaseCache | None):
    """LoRA on the base (shared + one per task for a multi-task run), LoftQ's start for a fresh run, and
    the fast path where the objective and device take it → ``(peft model, fast-path report or None)``."""
    checkpointed = cfg.train.gradient_checkpointing or cfg.train.offload_checkpoints
    model = add_lora(prep.loaded.model, cfg.lora, checkpointed, seed=cfg.train.seed,
                     task_type=head_of(cfg.model.task).peft_type, adapter_name=SHARED if prep.tasks else "default")
    if prep.tasks:
        for line in add_task_adapters(model, cfg.lora, prep.tasks, cfg.lora.task_r, cfg.train.seed):
            say(line)
    if cache is not None:
        cache.adapted = model
    if cfg.lora.init == "loftq" and fresh:  # a resumed run reads its adapter from the checkpoint
        say(start_loftq(model, prep.loaded.source))
    if cfg.train.init_adapter:  # the reference adapter is needed on resume too; the weights then come from the checkpoint
        say(start_from(model, cfg.train.init_adapter, reference=objective.reference))
    fast = None
    if cfg.train.fast_path and objective.supports.fast_path:
        fast = enable_fast_path(model, device)
    elif cfg.train.fast_path and device == "cuda":
        say(f"fast path off: the fused layers serve causal LMs, not model.task {cfg.model.task}")
    if fast is not None:
        say(str(fast))
    return model, fast


def fit_memory(cfg: C.RunConfig, decisions: Decisions, model, fast: FastPathReport | None, device: str) -> Decisions:
    """Weight streaming (as decided), then on CUDA the checkpoint mode the memory estimate says fits
    (``train.auto_memory``), then offloaded checkpoints where chosen → the decisions with the mode."""
    if device != "cuda":
        if decisions.offload_checkpoints:
            say(f"offload_checkpoints: nothing to offload to on {device}; plain gradient checkpointing")
        return decisions
    window = _stream_weights(model, fast, device, decisions.stream.keep_last) if decisions.stream.stream else 0
    lm = model.get_base_model()
    fused = fast is not None and fast.layers > 0
    if cfg.train.auto_memory and (shapes := _shapes(lm)) is not None:
        current = ("offload" if decisions.offload_checkpoints else
                   "checkpoint" if decisions.gradient_checkpointing else "none")
        weights = torch.cuda.memory_allocated() + int(cfg.train.resident_weights_gib * memory.GIB) + window
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        choice = memory_fit.checkpoint_mode(shapes, cfg, current, weights, trainable,
                                            fused and fast.fused == fast.layers, memory_fit.gpu_budget())
        say(choice.line)
        if choice.mode != current:
            enable_checkpointing(model, fused_layers=fused)
            decisions = dataclasses.replace(decisions, gradient_checkpointing=True,
                                            offload_checkpoints=choice.mode == "offload")
    elif cfg.train.auto_memory:
        say("memory estimate: skipped (not a decoder-only config)")
    if decisions.offload_checkpoints:
        shapes = _shapes(lm)
        if shapes is not None and (short := memory_fit.offload_shortfall(
                shapes, cfg.train.batch_size * cfg.data.max_seq_len)) is not None:
            raise QfineError(short)
        say(f"checkpointed inputs of {offload_checkpoints(model)} layers kept in pinned host memory")
    return decisions


def start(cfg: C.RunConfig, objective: Objective, prep: Prepared, model, fast, run_dir: Path, device: str,
          ckpt: Path | None, decisions: Decisions, callbacks) -> Started:
    """Answer the report's samples with the untrained model, create (or reopen) the run directory and
    write what describes the run, then build the trainer."""
    footprint = f"{cfg.model.source} ({cfg.model.quantization}) on {device}: {describe(model)}"
    say(footprint)
    samples = Samples(cfg, objective, prep.labels)
    main = distributed.is_main()  # a launched job's other ranks train and write nothing
    if main and samples.inputs:
        say(f"report samples: answering {len(samples.inputs)} held-out inputs before training")
    before = samples.answers(model, prep.loaded.tokenizer) if main else []
    distributed.barrier()  # every rank has checked the run directory before rank 0 empties it
    resume_step = step_of(ckpt) if ckpt is not None else None
    if main:
        start_run_dir(run_dir, resume=ckpt is not None)
        atomic_write_text(run_dir / "config.yaml", C.to_yaml(cfg))
        write_status(run_dir, "running")
        if prep.labels:
            save_labels(run_dir, prep.labels)
        if ckpt is None or not (run_dir / DATA_RECORD).is_file():
            write_data_record(run_dir, data_record(prep.train_ds))
        if resume_step is not None:
            truncate_metrics(run_dir / "metrics.jsonl", resume_step)  # the resumed run logs later steps again
    distributed.barrier()
    # the whole tree in training mode: from_pretrained leaves the inner model in eval mode while the
    # freshly built peft wrappers start in training mode, and Trainer only calls train() on a model whose
    # top-level flag is off — the fused layers, the fused loss and LoRA dropout all read the inner flags
    model.train()
    s2 = None
    if cfg.train.s2_attn:
        group = cfg.train.s2_group or cfg.data.max_seq_len // 4
        s2 = s2attn.enable(model, group)
        say(f"S²-Attn in training: {len(s2)} attention layers, groups of {group} tokens, half the heads shifted by "
            f"{group // 2}; full attention in eval and generation")
    trainer = build_trainer(objective, model, prep.loaded.tokenizer, prep.train_ds, prep.eval_ds, cfg, run_dir,
                            device, callbacks, resume_step)
    if prep.tasks:
        trainer.task_names, trainer.task_weights = prep.tasks, dict(cfg.data.task_weights)
    _cuda_graphs(cfg, trainer, fast, prep.tasks, device)
    facts = ReportFacts(title=f"qfine run · {run_dir.name}", model=f"{cfg.model.source} · {cfg.model.quantization}",
                        device=device, footprint=footprint, data=prep.data_line, config_yaml=C.to_yaml(cfg),
                        samples_note=samples.note, sensitivity=decisions.sensitivity)
    if fast is not None and fast.layers and cfg.train.resident_weights_gib > 0:
        dtype = model.get_input_embeddings().weight.dtype  # the dtype the fused layers compute in
        n, gib = keep_dequantized(model, cfg.train.resident_weights_gib, dtype)
        say(f"resident weights: {n} of {fast.layers} layers kept dequantized ({gib:.2f} GiB of "
            f"{cfg.train.resident_weights_gib:g})")
    return Started(trainer, facts, samples, before, s2)


def fit(cfg: C.RunConfig, started: Started, model, run_dir: Path, ckpt: Path | None) -> float:
    """Train (or, for a run killed after its last checkpoint, take that checkpoint's adapter); returns
    the seconds it took. A non-finite loss stops with the last good checkpoint named and untouched."""
    trainer, facts = started.trainer, started.facts
    t0 = time.perf_counter()
    resume_step = step_of(ckpt) if ckpt is not None else None
    try:
        if resume_step is not None and 0 < cfg.train.max_steps <= resume_step:
            # killed after its last checkpoint: Trainer would run one more step before it checks the limit
            done = finished_adapter(ckpt, cfg.train.load_best)
            load_checkpoint_adapter(model, done)
            trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
            say(f"{ckpt.name} is the run's last step: nothing left to train; the adapter comes from {done.name}")
        else:
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    except NonFiniteError as e:
        good = last_checkpoint(run_dir)
        facts.status = f"stopped: {e}"
        if distributed.is_main():
            atomic_write_text(run_dir / "report.html", render(run_dir, facts))
        raise QfineError(f"training stopped: {e}. No adapter was saved from the bad step; the last good checkpoint "
                         f"is {good or 'none (no checkpoint was written yet)'}, untouched. Lower the learning rate or "
                         "check the data, then --resume or start over.") from None
    except Exception as e:
        failure = write_failure(e, getattr(e, "filename", None) or run_dir, "training",
                                needed=disk.need(cfg, count_parameters(model)[0], resume=True).per_checkpoint)
        if failure is None:
            raise
        removed = drop_partial_checkpoints(run_dir) if distributed.is_main() else []
        good = last_checkpoint(run_dir)
        raise QfineError(f"{failure}; " + (f"the partial {', '.join(p.name for p in removed)} was removed; " if removed
                                           else "") +
                         f"the last whole checkpoint is {good or 'none (none was written yet)'}, untouched; free space, "
                         f"then continue with: qfine train {run_dir / 'config.yaml'} --resume") from None
    finally:
        release_dequantized(model)
        s2attn.disable(started.s2)
        for loader in (trainer.callback_handler.train_dataloader, trainer.callback_handler.eval_dataloader):
            shutdown_workers(loader)  # now, not whenever the garbage collector finds them
    if getattr(trainer, "graphed", None) is not None:
        say(trainer.graphed.summary())
    return time.perf_counter() - t0


def finish(cfg: C.RunConfig, prep: Prepared, model, started: Started, run_dir: Path, seconds: float) -> None:
    """Rank 0 saves the adapter, answers the samples again, writes report.html and prints the summary."""
    trainer, facts, samples = started.trainer, started.facts, started.samples
    if prep.tasks:  # the report's samples and anything after training see shared + the first task
        activate(model, prep.tasks, prep.tasks[0])
    if not distributed.is_main():
        distributed.barrier()  # rank 0 writes the adapter and the report
        return
    tokenizer = prep.loaded.tokenizer
    save_adapter(model, tokenizer, run_dir / "adapter", prep.loaded.source)
    ended = outcome(trainer.state, seconds, load_best=prep.eval_ds is not None and cfg.train.load_best)
    facts.adapter = f"step {ended.adapter_step} ({ended.adapter_why})"
    if samples.inputs:
        say(f"report samples: answering the {len(samples.inputs)} inputs with the trained adapter")
    facts.samples = list(zip(samples.shown(), started.before, samples.answers(model, tokenizer)))
    if prep.labels and prep.eval_ds is not None:
        facts.confusion = (prep.labels, dataset_scores(model, tokenizer, prep.eval_ds, len(prep.labels))["confusion"])
    atomic_write_text(run_dir / "report.html", render(run_dir, facts))
    for line in summary(ended, run_dir, samples.first_prompt()):
        say(line)
    distributed.barrier()


def train(cfg: C.RunConfig, overwrite: bool = False, resume: bool = False, callbacks=(),
          base_cache: BaseCache | None = None, stop: StopRequest | None = None) -> Path:
    """Fine-tune per ``cfg`` (left unchanged); returns the run directory (adapter in ``RUN_DIR/adapter``).
    With ``base_cache`` the frozen base is loaded once across calls; the caller takes each run's adapter
    out again with :meth:`BaseCache.release_adapter`.

    ``stop``: a request the caller raises to end the run after the current step (a checkpoint is
    saved, then :class:`~qfine.training.stop.Stopped` is raised). Without one, SIGTERM and SIGINT
    raise the run's own. The run directory is locked against a second writer meanwhile."""
    request = stop if stop is not None else StopRequest()
    with signals_stop(request) if stop is None else contextlib.nullcontext(), \
            lock.hold(cfg.output_dir, "qfine train") if distributed.is_main() else contextlib.nullcontext(), \
            thread_write_failures(cfg.output_dir):
        try:
            run_dir = _train(cfg, overwrite, resume, callbacks, base_cache, request)
        except BaseException as e:
            if distributed.is_main() and (read_status(cfg.output_dir) or {}).get("pid") == os.getpid():
                # only a run this process set up: a failure before that leaves the directory's own record
                ended = "stopped" if isinstance(e, (Stopped, KeyboardInterrupt)) else "failed"
                write_status(cfg.output_dir, ended, str(e) or type(e).__name__)
            raise
        if distributed.is_main():
            write_status(run_dir, "finished")
        return run_dir


def _train(cfg: C.RunConfig, overwrite: bool, resume: bool, callbacks, base_cache: BaseCache | None,
           request: StopRequest) -> Path:
    objective = objective_of(cfg)
    device = check(cfg, objective)
    decisions = settle(cfg)  # what follows from the config alone: resume compares the run it describes
    run_dir, ckpt, notes = check_run_dir(decisions.applied(cfg), overwrite, resume)
    for line in notes:
        say(line)
    decisions = decide(cfg, decisions, objective, device, resume)  # all that can fail on input, before any write
    for line in decisions.lines:
        say(line)
    prep = load(decisions.applied(cfg), objective, decisions.stream.stream, base_cache)
    say(prep.data_line, every_rank=True)
    check_stop(request, "while loading")
    bf16_ok = device == "cuda" and torch.cuda.is_bf16_supported()
    resolved = resolve_precision(cfg.train.precision, device, cfg.model.compute_dtype)
    precision, why = objective.precision(resolved, prep.loaded.model, bf16_ok)
    if why:  # the config keeps its own value (auto, say) unless the objective changed it
        decisions = decisions.said(why, precision=precision)
        say(why)
    run_cfg = decisions.applied(cfg)
    if ckpt is not None:
        check_resume_data(run_dir, data_record(prep.train_ds), run_cfg.data.path)
    model, fast = adapt(run_cfg, objective, prep, device, ckpt is None, base_cache)
    if distributed.is_main():
        say(disk.check(run_cfg, count_parameters(model)[0], resume=ckpt is not None))
    decisions = fit_memory(run_cfg, decisions, model, fast, device)
    run_cfg = decisions.applied(cfg)
    check_stop(request, "before training")
    stopper = StopAtStep(request)
    started = start(run_cfg, objective, prep, model, fast, run_dir, device, ckpt, decisions, [*callbacks, stopper])
    seconds = fit(run_cfg, started, model, run_dir, ckpt)
    if stopper.stopped_at is not None:
        stopped(started, run_dir, stopper.stopped_at, request)
    finish(run_cfg, prep, model, started, run_dir, seconds)
    return run_dir


def stopped(started: Started, run_dir: Path, step: int, request: StopRequest) -> None:
    """A run stopped on request at ``step``: its checkpoint is sealed; write the report and raise
    :class:`Stopped` with the command that continues it."""
    ckpt = run_dir / "checkpoints" / f"checkpoint-{step}"
    planned = started.trainer.state.max_steps
    started.facts.status = f"stopped by {request.reason} at step {step} of {planned}; continue with --resume"
    if distributed.is_main():
        atomic_write_text(run_dir / "report.html", render(run_dir, started.facts))
    distributed.barrier()
    raise Stopped(f"stopped by {request.reason} at step {step} of {planned}: {ckpt} saved; continue with: "
                  f"qfine train {run_dir / 'config.yaml'} --resume", request.exit_code)


# ---- helpers ------------------------------------------------------------------------------------

def _shapes(lm) -> memory.Shapes | None:
    try:
        return memory.Shapes.from_config(lm.config)
    except (AttributeError, TypeError):
        return None


def _cuda_graphs(cfg: C.RunConfig, trainer, fast, tasks, device: str) -> None:
    """Replay the training step as CUDA graphs where the fast path runs and nothing switches per batch."""
    if not (cfg.train.cuda_graphs and device == "cuda"):
        return
    if tasks:
        say("CUDA graphs off: each multi-task batch switches the active adapters")
    elif fast is not None and fast.layers and distributed.world_size() > 1:
        say("CUDA graphs off: not tested under DDP (several ranks); the fused layers still run")
    elif fast is not None and fast.layers:
        say(trainer.enable_cuda_graphs(cfg.data.max_seq_len))


def _stream_weights(model, fast, device: str, keep_last: int = 0) -> int:
    """Install weight streaming on the adapted model (placing the rest of it on the GPU); returns the
    bytes of the layers' device copies at once, for the memory estimate."""
    if fast is None or fast.fused != fast.layers or not fast.layers:
        why = fast.reason if fast is not None and fast.reason else "some decoder layers run peft's reference layer"
        raise QfineError(f"train.stream_weights: the weights stream inside the fused layers, and {why}")
    ws = weight_stream.install(model, device, keep_last=keep_last)
    count = sum(1 for slots in ws.slots if slots)  # the streamed layers
    per_layer = ws.streamed_bytes // max(1, count)
    size = (f"{ws.streamed_bytes / memory.GIB:.2f} GiB" if ws.streamed_bytes >= memory.GIB // 10
            else f"{ws.streamed_bytes / 2**20:.2f} MiB")
    say(f"weight streaming: {size} of frozen weights of {count} of {len(ws.layers)} decoder layers in pinned host "
        "memory, each layer's copied to the GPU one layer ahead of use")
    return memory.STREAM_WINDOW * per_layer


def enable_checkpointing(model, fused_layers: bool) -> None:
    """Gradient checkpointing on an adapted model (as :func:`qfine.add_lora` sets it up); where the fast
    path swapped the layers, through its recompute (as :func:`qfine.fast.apply_fast_path` installs it)."""
    enable_plain_checkpointing(model)
    if fused_layers:
        install_checkpointing(causal_lm(model).model.layers, offload=False)
