"""The real embedded SmolLM2-135M: evaluation runs end to end, and batched greedy generation with left
padding equals one-at-a-time generation on the real model (sdpa attention, as `dualsft eval` loads it)."""

from __future__ import annotations

import math

import pytest

from dualsft.data.build import DataBuildConfig, build_splits
from dualsft.evaluation.evaluate import EvalConfig, evaluate_model
from dualsft.evaluation.generate import greedy_generate, prompt_ids
from dualsft.io import write_jsonl


@pytest.mark.slow
def test_smollm2_eval_end_to_end(tmp_path):
    from dualsft.models import load_model, load_tokenizer

    tok = load_tokenizer(None)
    model = load_model(None, attn_implementation="sdpa")
    s = build_splits(DataBuildConfig(pool_size=2, val_size=1, test_size=4, stability_size=2, humaneval_size=1,
                                     pool_tasks="chain_sum,gcd"))
    write_jsonl(tmp_path / "test.jsonl", s["test"])
    write_jsonl(tmp_path / "stability.jsonl", s["stability"])
    cfg = EvalConfig(batch_size=4, max_new_tokens=6, max_length=384)
    res = evaluate_model(model, tok, None, tmp_path, cfg)
    m = res["metrics"]
    assert 0.0 < m["target"]["loss"]["mean"] < 20.0 and m["target"]["accuracy"]["n"] == 4
    assert math.isfinite(m["general"]["humaneval"]["loss"]["mean"])
    for r in res["predictions"]:
        if "generation" in r:
            assert len(tok(r["generation"], add_special_tokens=False)["input_ids"]) <= 6
    # left padding on the real model: a batch of prompts of different lengths == one at a time
    from dualsft.data.formats import load_examples

    exs = load_examples(tmp_path / "test.jsonl")[:3] + load_examples(tmp_path / "stability.jsonl")[:1]
    prompts = [prompt_ids(e, tok, "chat", 384) for e in exs]
    assert len({len(p) for p in prompts}) > 1
    batched = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    assert batched == [greedy_generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
