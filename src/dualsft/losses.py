"""Per-example losses: l(z; θ) = token-mean NLL over the response tokens of z (docs/method.md §2).

A batch is a dict of right- or left-padded tensors:
    input_ids [B, T] long, attention_mask [B, T] long (1 = real token), labels [B, T] long
    (-100 on prompt and padding tokens; otherwise the token id to predict AT THAT POSITION,
    i.e. labels == input_ids on response tokens; the shift happens here, as in transformers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL after the causal shift.

    Args:
        logits: [B, T, V] model outputs.
        labels: [B, T] targets with IGNORE_INDEX on masked positions.
    Returns:
        nll [B, T-1] (0 where masked) and mask [B, T-1] (float, 1 where a response token is predicted).
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    mask = shift_labels.ne(IGNORE_INDEX)
    safe = shift_labels.masked_fill(~mask, 0)
    logp = F.log_softmax(shift_logits.float() if shift_logits.dtype in (torch.float16, torch.bfloat16) else shift_logits, dim=-1)
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return nll * mask, mask.to(nll.dtype)


def per_example_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """l_n for each example: mean NLL over its response tokens. Returns [B].

    An example with no response token would divide by zero; the data layer rejects those,
    so here the denominator is clamped to 1 only to keep such a row finite (its loss is 0).
    """
    nll, mask = token_nll(logits, labels)
    return nll.sum(-1) / mask.sum(-1).clamp_min(1.0)


def per_example_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the model on ``batch`` and return the per-example losses l_n, shape [B]."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return per_example_loss_from_logits(out.logits, batch["labels"])
