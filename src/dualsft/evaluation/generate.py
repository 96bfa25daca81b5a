"""Batched greedy generation with LEFT padding (so every row's last prompt token sits at the same
position and the new tokens line up), stopping at EOS.

Prompts are the exact prompt token ids the training data uses (``formats.tokenize_example``: the tokens
before the first response label), so evaluation asks the question exactly as training taught it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from dualsft.data.formats import Example, Template, tokenize_example
from dualsft.losses import IGNORE_INDEX

log = logging.getLogger(__name__)


def prompt_ids(example: Example, tokenizer: Any, template: Template, max_length: int) -> list[int]:
    """Token ids of the prompt side of ``example`` (everything before the first response label)."""
    tok = tokenize_example(example, tokenizer, template, max_length)
    n_prompt = next((i for i, lab in enumerate(tok.labels) if lab != IGNORE_INDEX), len(tok.labels))
    return tok.input_ids[:n_prompt]


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left-pad token lists. Returns input_ids [B, T] and attention_mask [B, T] (0 on padding)."""
    T = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (T - len(s)) + s for s in seqs], dtype=torch.long, device=device)
    att = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": att}


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a response: EOS, and the chat end-of-turn token when the tokenizer has one."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    """Generated ids up to (excluding) the first stop token."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int = 8,
                    batch_size: int = 16, desc: str = "generate") -> list[list[int]]:
    """Greedy continuations of token-id prompts, batched with left padding; each is cut at its first stop.

    Args:
        prompts: N lists of prompt token ids.
    Returns:
        N lists of generated token ids (without the stop token).
    """
    device = next(model.parameters()).device
    stops = stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    # Sort by length so rows in a batch need little padding; results are put back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        rows = order[s : s + batch_size]
        enc = left_pad([prompts[i] for i in rows], pad, device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=stops, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        new = gen[:, enc["input_ids"].shape[1]:].tolist()  # [B, <= max_new_tokens]
        for i, ids in zip(rows, new):
            out[i] = cut_at_stop(ids, stops)
    model.train(was_training)
    return out


def generate_texts(model: torch.nn.Module, tokenizer: Any, examples: list[Example], template: Template,
                   max_length: int, max_new_tokens: int = 8, batch_size: int = 16, desc: str = "generate") -> list[str]:
    """Greedy responses (decoded, special tokens dropped) to the prompts of ``examples``, in order."""
    prompts = [prompt_ids(e, tokenizer, template, max_length) for e in examples]
    ids = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc)
    return [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
