"""Preference losses on sequence log-probabilities: DPO, SimPO, ORPO and KTO.

Each takes the summed log-probabilities of the scored (completion) tokens, their counts and, where the
loss needs a reference, the same sums under the reference model (the base with the adapter off), all
fp32 of shape (pairs,) or (rows,), and returns ``(loss, metrics)``: a 0-dim loss averaged over the
batch and a dict of detached per-batch means named as TRL logs them (``rewards/chosen`` …).

* DPO (arXiv 2305.18290): −log σ(β·[(π_c − r_c) − (π_r − r_r)]).
* SimPO (arXiv 2405.14734): −log σ(β·(π̄_c − π̄_r) − γ), π̄ the per-token mean; no reference.
* ORPO (arXiv 2403.07691): NLL of the chosen tokens − λ·log σ(log odds_c − log odds_r), with
  log odds = π̄ − log(1 − exp π̄); no reference (λ is ``beta`` here, as in TRL).
* KTO (arXiv 2402.01306): per row, desirable 1 − σ(β·(ρ − z)), undesirable 1 − σ(β·(z − ρ)), with
  ρ = π − r and z = max(0, mean over mismatched prompt/completion rows of π − r), detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# objective → (default beta, default gamma): TRL's defaults for DPO/KTO/ORPO, the SimPO paper's for SimPO
DEFAULTS = {"dpo": (0.1, 0.0), "simpo": (2.0, 0.5), "orpo": (0.1, 0.0), "kto": (0.1, 0.0)}


def _means(**values: torch.Tensor) -> dict[str, float]:
    return {k: float(v.detach().float().mean()) for k, v in values.items() if v.numel()}


def _pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, logp_c, logp_r) -> dict[str, float]:
    return _means(**{"rewards/chosen": chosen, "rewards/rejected": rejected,
                     "rewards/margins": chosen - rejected,
                     "rewards/accuracies": (chosen > rejected).float(),
                     "logps/chosen": logp_c, "logps/rejected": logp_r})


def dpo(logp_c, logp_r, ref_c, ref_r, beta: float) -> tuple[torch.Tensor, dict]:
    """Sigmoid DPO over pairs; rewards β·(π − r)."""
    chosen, rejected = beta * (logp_c - ref_c), beta * (logp_r - ref_r)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, _pair_metrics(chosen, rejected, logp_c, logp_r)


def simpo(logp_c, logp_r, n_c, n_r, beta: float, gamma: float) -> tuple[torch.Tensor, dict]:
    """SimPO over pairs; rewards β·π̄ (length-normalised, reference-free)."""
    chosen, rejected = beta * logp_c / n_c, beta * logp_r / n_r
    loss = -F.logsigmoid(chosen - rejected - gamma).mean()
    return loss, _pair_metrics(chosen, rejected, logp_c, logp_r)


def orpo(logp_c, logp_r, n_c, n_r, beta: float) -> tuple[torch.Tensor, dict]:
    """ORPO over pairs: the chosen tokens' mean NLL (over all chosen tokens of the batch) plus the
    odds-ratio term; rewards β·π̄."""
    avg_c, avg_r = logp_c / n_c, logp_r / n_r
    log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
    ratio = F.logsigmoid(log_odds)
    nll = -logp_c.sum() / n_c.sum()
    loss = nll - beta * ratio.mean()
    metrics = _pair_metrics(beta * avg_c, beta * avg_r, logp_c, logp_r)
    metrics.update(_means(nll_loss=nll, log_odds_ratio=ratio))
    return loss, metrics


def kto(logp, ref, desirable, kl_logp, kl_ref, beta: float) -> tuple[torch.Tensor, dict]:
    """KTO over unpaired rows; ``desirable`` (rows,) bool; ``kl_logp``/``kl_ref`` the sums of the
    mismatched rows (prompt i with completion j ≠ i) that estimate the KL term."""
    z = (kl_logp - kl_ref).mean().clamp(min=0).detach()
    ratio = logp - ref
    losses = torch.where(desirable, 1 - torch.sigmoid(beta * (ratio - z)), 1 - torch.sigmoid(beta * (z - ratio)))
    rewards = beta * ratio
    metrics = _means(**{"rewards/chosen": rewards[desirable], "rewards/rejected": rewards[~desirable],
                        "logps/chosen": logp[desirable], "logps/rejected": logp[~desirable], "kl": z})
    if desirable.any() and (~desirable).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.mean(), metrics
