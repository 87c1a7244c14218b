"""The seed experiment: teach one fact, then ask before training, after, and after merging.

It shows the point of the exact merge. Greedy answers are taken from

* the 4-bit base before training,
* the 4-bit base + trained adapter,
* the exact merge (dequantize, add the LoRA update in fp32, cast), reloaded from disk with plain
  transformers,
* peft's ``merge_and_unload`` on the 4-bit model, which requantizes the merged weight,

and the logits of each merged variant are compared with the unmerged trained model on the
prompt + reply tokens. ``qfine demo`` prints the result; the acceptance tests assert on it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM

from qfine import config as C
from qfine.data.templates import set_template
from qfine.export.merge import DTYPES, save_merged
from qfine.generation.generate import generate
from qfine.generation.load import load_for_inference
from qfine.models.loading import Loaded, load_model
from qfine.training import train
from qfine.training.callbacks import read_losses
from qfine.util.compare import relative_difference


@dataclass
class Fact:
    """A question, the reply to teach, and the string whose presence marks the fact as known."""

    question: str
    reply: str
    marker: str


SEED_FACT = Fact("What day was I born?", "You were born on January 1, 2058.", "January 1, 2058")


@dataclass
class ProbeResult:
    before: str
    after: str
    merged: str
    peft_merged: str
    merged_rel_diff: float  # ‖logits(merged from disk) − logits(4-bit + adapter)‖ / ‖·‖
    peft_rel_diff: float  # the same for peft's merge_and_unload on the 4-bit model
    run_dir: Path
    merged_dir: Path
    train_seconds: float
    losses: list[float] = field(default_factory=list)

    def knows(self, fact: Fact) -> dict[str, bool]:
        """Whether each answer contains the fact's marker."""
        return {k: fact.marker in getattr(self, k) for k in ("before", "after", "merged", "peft_merged")}


def fact_config(source: str, data: Path, run_dir: Path, steps: int = 30, lr: float = 1e-3,
                lora: dict | None = None) -> C.RunConfig:
    """The seed's recipe: nf4 + double quant, r=16 on all linear layers, constant-ish lr, batch 4;
    ``lora`` overrides LoRA settings (variant, init, rslora, ...)."""
    cfg = C.RunConfig(output_dir=str(run_dir))
    cfg.model.source = source
    cfg.lora = C.LoraSettings(**{"r": 16, "alpha": 32, "dropout": 0.0, **(lora or {})})
    cfg.data.path = str(data)
    cfg.train = C.TrainConfig(max_steps=steps, batch_size=4, learning_rate=lr, lr_scheduler="cosine",
                              save_steps=steps, logging_steps=max(1, steps // 10), report_samples=1)
    return cfg


def _teacher_forced_ids(loaded: Loaded, fact: Fact) -> torch.Tensor:
    tok = loaded.tokenizer
    msgs = [{"role": "user", "content": fact.question}, {"role": "assistant", "content": fact.reply}]
    return torch.tensor([tok.encode(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)])


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(model.device)).logits.float().cpu()


def seed_experiment(fact: Fact, workdir: str | Path, source: str = "default", steps: int = 30, lr: float = 1e-3,
                    merge_dtype: str = "bf16", repeats: int = 8, log: Callable[[str], None] = print,
                    lora: dict | None = None) -> ProbeResult:
    """Run the experiment in ``workdir`` (data.jsonl, run/, merged/) and return what was seen."""


    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data.jsonl"
    row = json.dumps({"messages": [{"role": "user", "content": fact.question},
                                   {"role": "assistant", "content": fact.reply}]})
    data.write_text((row + "\n") * repeats, encoding="utf-8")

    base = load_model(source)
    base.model.eval()
    base.model.config.use_cache = True
    set_template(base.tokenizer)
    before = generate(base, fact.question, max_new_tokens=40)
    log(f"before training: {before!r}")
    del base

    cfg = fact_config(source, data, workdir / "run", steps, lr, lora)
    t0 = time.perf_counter()
    run_dir = train(cfg)
    train_seconds = time.perf_counter() - t0

    trained = load_for_inference(str(run_dir))
    after = generate(trained, fact.question, max_new_tokens=40)
    log(f"after training (4-bit base + adapter): {after!r}")
    ids = _teacher_forced_ids(trained, fact)
    reference = _logits(trained.model, ids)

    merged_dir = save_merged(trained.model, trained.tokenizer, workdir / "merged", dtype=merge_dtype)
    plain = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=DTYPES[merge_dtype]).eval()
    merged_rel = relative_difference(_logits(plain, ids), reference)
    merged = generate(Loaded(plain, trained.tokenizer, str(merged_dir), "cpu", DTYPES[merge_dtype]), fact.question, 40)
    log(f"after exact merge ({merge_dtype}, reloaded with plain transformers): {merged!r}  "
        f"[logits rel. diff {merged_rel:.2e}]")
    del plain

    peft_model = trained.model.merge_and_unload()  # peft requantizes the merged weight to 4-bit here
    peft_rel = relative_difference(_logits(peft_model, ids), reference)
    peft_merged = generate(Loaded(peft_model, trained.tokenizer, "", trained.device, trained.compute_dtype),
                           fact.question, 40)
    log(f"after peft merge_and_unload on the 4-bit model: {peft_merged!r}  [logits rel. diff {peft_rel:.2e}]")
    return ProbeResult(before, after, merged, peft_merged, merged_rel, peft_rel, run_dir, merged_dir,
                       train_seconds, read_losses(run_dir / "metrics.jsonl"))
