"""Batched greedy generation with left padding equals one-at-a-time generation."""

from __future__ import annotations

import torch

from dualsft.data.formats import Example
from dualsft.evaluation.generate import cut_at_stop, greedy_generate, left_pad, prompt_ids, stop_ids
from dualsft.testing import micro_llama


def test_left_pad():
    b = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_equals_one_at_a_time(tokenizer):
    # float32: in float64, eager attention in transformers 5.24 turns fully masked (left-pad) query rows
    # into NaN, which then leaks through the values of later layers (measured; sdpa is not affected).
    model = micro_llama(seed=3, dtype=torch.float32)
    texts = ["What is 2 + 3?", "Hi", "A much longer prompt, so that the batch needs real left padding here."]
    prompts = [prompt_ids(Example(i, (("user", t),), "x"), tokenizer, "chat", 200) for i, t in enumerate(texts)]
    assert len({len(p) for p in prompts}) == 3
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    single = [greedy_generate(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(0 < len(g) <= 12 for g in batched)


def test_prompt_ids_are_the_training_prompt(tokenizer):
    ex = Example(0, (("user", "2+3?"),), "5")
    ids = prompt_ids(ex, tokenizer, "chat", 200)
    assert tokenizer.decode(ids) == "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"


def test_stop_at_eos(tokenizer):
    stops = stop_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    assert cut_at_stop([5, 6, stops[0], 7], stops) == [5, 6]
    assert cut_at_stop([5, 6], stops) == [5, 6]
