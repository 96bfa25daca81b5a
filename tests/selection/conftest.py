"""A real scored micro run (micro Llama, toy pool, real scoring API) for the selection tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dualsft.data.formats import batches, load_examples, tokenize_examples
from dualsft.io import save_tensors, write_json, write_jsonl
from dualsft.models import load_model, load_tokenizer, model_fingerprint
from dualsft.runs import build_metadata
from dualsft.scoring.rows import row_scores
from dualsft.scoring.stats import gradient_sum, param_scores, target_gradient, trainable_params
from dualsft.testing import one_torch_thread, toy_records

N_POOL = 24


@dataclass
class ScoredRun:
    """Paths and statistics of a scored micro run (tensors as written to RUN/scores and RUN/warmup)."""

    run: Path
    pool: Path
    model_dir: Path
    eta: float
    v: dict
    c: dict
    G: dict
    phi_param: dict
    phi_data: torch.Tensor


def build_scored_run(run: Path, model_dir: Path, order: int = 2) -> ScoredRun:
    """Score a toy pool with the real scoring functions and write the scores contract files."""
    run.mkdir(parents=True, exist_ok=True)
    pool = run / "pool.jsonl"
    recs = [{**r, "task": ["add", "sum", "plus"][i % 3], "source": "toy"} for i, r in enumerate(toy_records(N_POOL))]
    write_jsonl(pool, recs)
    model = load_model(str(model_dir), dtype="float32", device="cpu")
    tok = load_tokenizer(str(model_dir))
    toks = tokenize_examples(load_examples(pool), tok, "chat", 64)
    target = tokenize_examples(load_examples(_write(run / "target.jsonl", toy_records(6, seed=1))), tok, "chat", 64)
    params = trainable_params(model)
    pb = batches(toks, 8, tok.pad_token_id)
    G = gradient_sum(model, pb, params)
    v = target_gradient(model, batches(target, 8, tok.pad_token_id), params)
    c = {n: g.pow(2) / N_POOL + 1e-8 for n, g in G.items()}
    # η chosen so the second-order term is as large as the first-order one: the tests then see both.
    first = sum(float((v[n] * G[n]).abs().sum()) for n in G)
    second = sum(float((c[n] * G[n] ** 2).sum()) for n in G)
    eta = first / second if order == 2 else 1e-2
    u = {n: eta * v[n] - (0.5 * eta**2 * c[n] * G[n] if order == 2 else 0) for n in G}
    phi_param = param_scores(u, G)
    phi_data, losses = row_scores(model, pb, u)
    sdir, wdir = run / "scores", run / "warmup"
    save_tensors(sdir / "param_scores.safetensors", phi_param)
    save_tensors(sdir / "u.safetensors", u)
    save_tensors(sdir / "v.safetensors", v)
    save_tensors(sdir / "grad_sum.safetensors", G)
    save_tensors(wdir / "exp_avg_sq.safetensors", c)
    write_jsonl(sdir / "data_scores.jsonl", [{"index": t.index, "score": float(s), "loss": float(lo)}
                                              for t, s, lo in zip(toks, phi_data, losses)])
    write_json(sdir / "summary.json", {"note": "test fixture"})
    cfg = {"eta": eta, "order": order, "template": "chat", "max_length": 64}
    write_json(sdir / "metadata.json", build_metadata("scores", cfg, str(model_dir), model_fingerprint(model),
                                                      data_files={"pool": pool}))
    write_json(wdir / "metadata.json", build_metadata("warmup", {}, str(model_dir), None))
    return ScoredRun(run, pool, model_dir, eta, v, c, G, phi_param, phi_data)


def _write(path: Path, recs: list[dict]) -> Path:
    write_jsonl(path, recs)
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread for every test here (see ``dualsft.testing.one_torch_thread`` for why)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def scored_run(tmp_path_factory, micro_model_dir) -> ScoredRun:
    """One scored micro run shared by the tests that only read it (copy it before writing into it)."""
    with one_torch_thread():
        return build_scored_run(tmp_path_factory.mktemp("scored") / "run", micro_model_dir)
