"""The launch form's presets: the recipes of ``examples/*.yaml`` (the seeds' recipes), without their
output folder and data files, which the form chooses. ``tests/test_studio.py`` checks that each
equals its example file, so the two never drift apart."""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "chat-sft-default": {
        "title": "Bundled model · chat SFT (teach a fact, 30 steps on CPU)",
        "config": {"model": {"source": "default", "quantization": "nf4", "double_quant": True},
                   "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear"]},
                   "data": {"max_seq_len": 512},
                   "train": {"max_steps": 30, "batch_size": 4, "learning_rate": 1.0e-3, "lr_scheduler": "cosine",
                             "logging_steps": 1, "save_steps": 30}},
    },
    "dpo-default": {
        "title": "Bundled model · DPO on preference pairs",
        "config": {"model": {"source": "default", "quantization": "nf4"},
                   "lora": {"r": 16, "alpha": 32},
                   "data": {"max_seq_len": 256},
                   "train": {"objective": "dpo", "beta": 0.1, "max_steps": 32, "batch_size": 4,
                             "learning_rate": 5.0e-4, "lr_scheduler": "cosine", "save_steps": 16, "eval_steps": 16}},
    },
    "mistral-7b-qlora": {
        "title": "Mistral-7B · QLoRA (NF4, r=16, attention projections)",
        "config": {"model": {"source": "mistralai/Mistral-7B-v0.1", "quantization": "nf4", "double_quant": True},
                   "lora": {"r": 16, "alpha": 32, "dropout": 0.05,
                            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                   "data": {"max_seq_len": 512},
                   "train": {"epochs": 3, "batch_size": 4, "grad_accum": 4, "learning_rate": 2.0e-4}},
    },
    "mistral-7b-dpo": {
        "title": "Mistral-7B-Instruct · DPO (NF4, r=16, paged 8-bit AdamW)",
        "config": {"model": {"source": "mistralai/Mistral-7B-Instruct-v0.2", "quantization": "nf4",
                             "double_quant": True},
                   "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["all-linear"]},
                   "data": {"max_seq_len": 2048},
                   "train": {"objective": "dpo", "beta": 0.1, "epochs": 1, "batch_size": 2, "grad_accum": 8,
                             "learning_rate": 5.0e-6, "warmup_ratio": 0.1, "optimizer": "paged_adamw_8bit",
                             "save_steps": 100}},
    },
    "llama-70b-memory": {
        "title": "Llama-3.1-70B · 24 GiB GPU (r=64, checkpointing, paged 8-bit AdamW)",
        "config": {"model": {"source": "meta-llama/Llama-3.1-70B", "quantization": "nf4", "double_quant": True},
                   "lora": {"r": 64, "alpha": 128, "dropout": 0.05, "target_modules": ["all-linear"]},
                   "data": {"max_seq_len": 2048},
                   "train": {"epochs": 1, "batch_size": 1, "grad_accum": 16, "gradient_checkpointing": True,
                             "optimizer": "paged_adamw_8bit", "max_grad_norm": 0.3, "warmup_ratio": 0.03,
                             "lr_scheduler": "cosine", "learning_rate": 2.0e-4}},
    },
}


def flat(preset: str) -> dict[str, object]:
    """A preset's fields as the form holds them: ``{"section.field": value}``."""
    return {f"{section}.{name}": value for section, fields in PRESETS[preset]["config"].items()
            for name, value in fields.items()}
