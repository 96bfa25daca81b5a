"""Per-example losses: l(z; θ) = token-mean NLL over the response tokens of z (docs/method.md §2).

A batch is a dict of right- or left-padded tensors:
    input_ids [B, T] long, attention_mask [B, T] long (1 = real token), labels [B, T] long
    (-100 on prompt and padding tokens; otherwise the token id to predict AT THAT POSITION,
    i.e. labels == input_ids on response tokens; the shift happens here, as in transformers).

    per_example_loss(model, batch)                 full logits [B, T, V] (scoring's passes hook into them)
    chunked_per_example_loss(model, batch, chunk)  the same losses with the LM head and cross-entropy on the
                                                   response positions only, ``chunk`` at a time, recomputed
                                                   in the backward (training and warm-up, --loss-chunk)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dualsft.errors import ConfigError
from dualsft.models import base_lm

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


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder, LM head) of a transformers causal LM, or of a peft model around one: the decoder maps
    input ids to the last hidden states [B, T, H]; the head maps hidden states to logits. Raises ConfigError
    for a model without that split (no ``base_model`` distinct from the model, or no output embeddings)."""
    lm = base_lm(model)
    decoder = getattr(lm, "base_model", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if decoder is None or decoder is lm or head is None:
        raise ConfigError(f"--loss-chunk: {type(lm).__name__} has no separate decoder and LM head; use --loss-chunk 0")
    return decoder, head


# config attributes of models whose logits are NOT head(hidden states) (soft-capping or scaling after the head)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def check_plain_head(model: torch.nn.Module) -> None:
    """Raise ConfigError when the model transforms its logits after the LM head (the chunked loss would
    compute another loss): a non-trivial value of one of LOGIT_TRANSFORMS in its config."""
    config = getattr(model, "config", None)
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0, 0, 0.0):
            raise ConfigError(f"--loss-chunk: this model's logits are transformed after the LM head "
                              f"(config.{name} = {value}); use --loss-chunk 0")


def response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask [B, T-1], rows [K], cols [K]): the positions t whose next token is a response label, after the
    causal shift, and their (example, position) coordinates in row-major order."""
    mask = labels[:, 1:].ne(IGNORE_INDEX)
    rows, cols = mask.nonzero(as_tuple=True)
    return mask, rows, cols


def per_example_mean(parts: list[torch.Tensor], rows: torch.Tensor, mask: torch.Tensor,
                     hidden: torch.Tensor) -> torch.Tensor:
    """[B] mean over each example's response positions of per-position values (``parts``: chunks of [K] in
    ``rows`` order), in at least float32. Starts from zeros derived from ``hidden`` [B, T, H] so the result
    keeps its graph (a detached ``hidden`` gives a constant) even when no position carries a value."""
    dtype = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    total = (hidden[:, 0, 0] * 0).to(dtype)
    if parts:
        total = total.index_add(0, rows, torch.cat(parts).to(dtype))
    return total / mask.sum(-1).clamp_min(1).to(dtype)


def _chunk_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL [K] of ``targets`` [K] under head(hidden) for hidden [K, H] (softmax in at least float32)."""
    logits = head(hidden)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets, reduction="none")


def chunked_per_example_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int = 1024) -> torch.Tensor:
    """``per_example_loss`` without the [B, T, V] logits: the decoder's hidden states at the positions that
    predict a response token only (K of them), then the LM head and cross-entropy ``chunk`` positions at a
    time, each chunk under non-reentrant activation checkpointing (its [chunk, V] logits are recomputed in
    the backward, never kept). Peak logits memory: one chunk's instead of B·T·V. Same losses and gradients
    up to float rounding (tests/training/test_chunked_loss.py). Returns [B], as ``per_example_loss``.

    Args:
        model: a causal LM with ``causal_lm_parts`` (checked by ``check_plain_head``).
        batch: input_ids, attention_mask, labels [B, T] (see the module docstring).
        chunk: positions per head + cross-entropy call, >= 1.
    """
    if chunk < 1:
        raise ConfigError(f"--loss-chunk must be >= 1 here, got {chunk}")
    check_plain_head(model)
    decoder, head = causal_lm_parts(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     use_cache=False).last_hidden_state  # [B, T, H]
    mask, rows, cols = response_positions(batch["labels"])
    picked, targets = hidden[:, :-1][rows, cols], batch["labels"][:, 1:][rows, cols]  # [K, H], [K]
    parts = [checkpoint(_chunk_nll, head, picked[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
             for i in range(0, len(targets), chunk)]
    return per_example_mean(parts, rows, mask, hidden)


def training_loss(chunk: int):
    """The per-example loss function of the training loop: ``per_example_loss`` (``chunk`` 0) or
    ``chunked_per_example_loss`` with ``chunk`` positions per LM-head call."""
    if chunk <= 0:
        return per_example_loss
    return functools.partial(chunked_per_example_loss, chunk=chunk)
