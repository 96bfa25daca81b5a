"""Delta artifacts: round trip, fingerprint refusal, merge into a loadable HF folder."""

from __future__ import annotations

import pytest
import torch
from train_helpers import fresh, random_mask, toy_examples

from dualsft.errors import MetadataMismatchError
from dualsft.models import model_fingerprint
from dualsft.training.delta import apply_delta, extract_delta, load_delta, save_delta
from dualsft.training.loop import TrainSettings, train_restricted


def _trained(arch: str, method: str = "sparse"):
    exs, pad = toy_examples(8)
    model = fresh(arch)
    fp = model_fingerprint(model)
    mask = random_mask(model, 0.1) if method != "full" else None
    st = TrainSettings(method=method, lr=1e-2, batch_size=4, micro_batch_size=4, epochs=1, progress=False)
    res = train_restricted(model, exs, mask, st, pad)
    return res, mask, fp


@pytest.mark.parametrize("arch,method", [("llama-tied", "sparse"), ("gpt2-untied", "dense-masked"),
                                         ("llama-untied", "full")])
def test_delta_round_trip_is_exact(arch: str, method: str, tmp_path) -> None:
    res, mask, fp = _trained(arch, method)
    delta = extract_delta(res.model, mask, res.trainable, "micro", fp)
    save_delta(tmp_path / "delta.safetensors", delta)
    loaded = load_delta(tmp_path)
    assert loaded.base_fingerprint == fp and loaded.num_entries == delta.num_entries
    if mask is not None:
        assert all(i.dtype == torch.int32 for i in loaded.indices.values())
        assert loaded.num_entries == sum(v.numel() for v in mask.values())
    base = fresh(arch)
    out = apply_delta(base, tmp_path / "delta.safetensors")
    assert out is base
    trained = dict(res.model.named_parameters())
    for n, p in base.named_parameters():
        assert torch.equal(p.detach(), trained[n].detach()), n
    # tied weights stay tied after applying
    if base.config.tie_word_embeddings:
        assert base.lm_head.weight is base.get_input_embeddings().weight


def test_wrong_base_is_refused(tmp_path) -> None:
    res, mask, fp = _trained("llama-tied")
    save_delta(tmp_path / "delta.safetensors", extract_delta(res.model, mask, base_model="micro", base_fingerprint=fp))
    other = fresh("llama-tied")
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1.0
    with pytest.raises(MetadataMismatchError) as e:
        apply_delta(other, tmp_path)
    assert e.value.field == "base_fingerprint"
