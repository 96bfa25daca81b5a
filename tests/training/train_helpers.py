"""Helpers for the training tests: micro models, tokenised toy data, random masks."""

from __future__ import annotations

import functools

import torch

from dualsft.data.formats import Example, tokenize_examples
from dualsft.io import write_jsonl
from dualsft.selection.mask import compact_indices, save_mask
from dualsft.testing import byte_tokenizer, micro_gpt2, micro_llama, toy_records


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return byte_tokenizer()


def toy_examples(n: int, seed: int = 0):
    """n tokenised toy examples (byte tokenizer, chat template) and the pad token id."""
    tok = _tokenizer()
    exs = [Example(i, (("user", r["instruction"]),), r["response"], r) for i, r in enumerate(toy_records(n, seed))]
    return tokenize_examples(exs, tok, "chat", 64), tok.pad_token_id


def random_mask(model: torch.nn.Module, frac: float, seed: int = 0, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """{name: sorted int32 flat indices}: about ``frac`` of each tensor; names containing ``skip`` left out."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        if any(s in name for s in skip):
            continue
        k = max(1, int(frac * p.numel()))
        out[name] = compact_indices(torch.randperm(p.numel(), generator=g)[:k], p.numel())
    return out


MODELS = {
    "llama-tied": lambda dt: micro_llama(tied=True, dtype=dt),
    "llama-untied": lambda dt: micro_llama(tied=False, dtype=dt),
    "gpt2-tied": lambda dt: micro_gpt2(tied=True, dtype=dt),
    "gpt2-untied": lambda dt: micro_gpt2(tied=False, dtype=dt),
}


_CACHE: dict[tuple[str, torch.dtype], torch.nn.Module] = {}


def fresh(arch: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A copy of a cached micro model (building one costs seconds on a loaded machine)."""
    import copy

    key = (arch, dtype)
    if key not in _CACHE:
        _CACHE[key] = MODELS[arch](dtype)
    return copy.deepcopy(_CACHE[key])


def train_run_folder(tmp) -> tuple:
    """A RUN/ for `dualsft train` under ``tmp``: data/pool.jsonl (12 toy records), selection/subset.jsonl (the 6
    even ones) and a 5% random mask.safetensors, plus a tied micro-Llama model folder. -> (run, model_dir, mask)."""
    model_dir = tmp / "model"
    model = micro_llama(tied=True)
    model.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    pool = toy_records(12)
    write_jsonl(tmp / "run" / "data" / "pool.jsonl", pool)
    write_jsonl(tmp / "run" / "selection" / "subset.jsonl",
                [{**r, "index": i, "score": 1.0} for i, r in enumerate(pool) if i % 2 == 0])
    mask = random_mask(model, 0.05)
    save_mask(tmp / "run" / "selection" / "mask.safetensors", mask, {n: tuple(p.shape) for n, p in model.named_parameters()})
    return tmp / "run", model_dir, mask
