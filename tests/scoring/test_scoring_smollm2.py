"""The real SmolLM2-135M (embedded model), float32: batched row scores against the per-example oracle."""

from __future__ import annotations

import pytest
import torch
from scoring_helpers import rel_err

from dualsft.data.formats import batches, normalise_record, tokenize_examples
from dualsft.scoring.rows import row_scores
from dualsft.scoring.stats import trainable_params


@pytest.mark.slow
def test_smollm2_ghost_matches_oracle_float32():
    """16 real examples (reasoning-gym), every parameter of the tied 135M model, relative error ≤ 1e-3."""
    import reasoning_gym

    from dualsft.models import load_model, load_tokenizer

    tok = load_tokenizer(None)
    model = load_model(None, dtype="float32", device="cpu")
    items = reasoning_gym.create_dataset("basic_arithmetic", size=16, seed=1)
    ex = [normalise_record({"question": it["question"], "answer": str(it["answer"])}, "rg", i)
          for i, it in enumerate(items)]
    bs = batches(tokenize_examples(ex, tok, "chat", 64), 8, tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    u = {n: torch.randn(p.shape, generator=g) for n, p in trainable_params(model).items()}
    ref, ref_loss = row_scores(model, bs, u, method="exact")
    got, loss = row_scores(model, bs, u, method="ghost")
    assert len(got) == 16
    assert rel_err(got, ref) <= 1e-3
    assert rel_err(loss, ref_loss) <= 1e-4
