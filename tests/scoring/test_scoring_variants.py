"""The named scoring variants (docs/method.md §4 "Scoring variants") against brute-force float64 oracles:
``--data-score cosine`` (exact per-example gradient norms from the ghost pass), ``--target-gradient
normalized`` (v_new from per-example target norms), ``--score-tokens answer`` (answer-token loss),
``--precondition adam`` (u = P⊙(ηv − ½η²c⊙P⊙G)), ``--precondition adam-step`` (P from c and v) and
``--data-params linear`` (φ_data over the linear layers)."""

from __future__ import annotations

import pytest
import torch
from scoring_helpers import MODELS, random_direction, rel_err, toy_batches

from dualsft.data.formats import batches
from dualsft.losses import per_example_loss
from dualsft.scoring.passes import run_pass
from dualsft.scoring.rows import row_accumulators, row_step
from dualsft.scoring.stats import trainable_params

CASES = [(arch, tied) for arch in MODELS for tied in (True, False)]


def oracle_grads(model, batch) -> list[dict[str, torch.Tensor]]:
    """THE ORACLE: one backward per example (padding cut off), gradients in float64."""
    params = trainable_params(model)
    out = []
    for b in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][b].bool()
        one = {k: batch[k][b: b + 1, keep] for k in ("input_ids", "attention_mask", "labels")}
        grads = torch.autograd.grad(per_example_loss(model, one)[0], list(params.values()), allow_unused=True)
        out.append({n: g.double() for n, g in zip(params, grads) if g is not None})
    return out


def oracle_sq_norms(model, bs) -> torch.Tensor:
    return torch.tensor([sum(float(g.pow(2).sum()) for g in gs.values()) for b in bs for gs in oracle_grads(model, b)],
                        dtype=torch.float64)


@pytest.mark.parametrize("grad_sum", [False, True])
@pytest.mark.parametrize("arch,tied", CASES)
def test_ghost_grad_norms_match_oracle(tokenizer, arch, tied, grad_sum):
    """‖g_n‖² over ALL trainable parameters (tied embedding/head cross term, biases, norms, position
    embeddings) from the batched ghost pass == one backward per example, in float64."""
    model = MODELS[arch](tied=tied, dtype=torch.float64)
    bs = toy_batches(tokenizer, 8, 4)
    u = random_direction(trainable_params(model))
    res = run_pass(bs, row_step(model, u, "ghost", grad_sum=grad_sum, norms=True),
                   row_accumulators(model, grad_sum, torch.float64))
    ref = oracle_sq_norms(model, bs)
    assert rel_err(res.rows["sq_norms"], ref) <= 1e-9
    exact = run_pass(bs, row_step(model, u, "exact", norms=True))
    assert rel_err(exact.rows["sq_norms"], ref) <= 1e-12


def test_ghost_grad_norms_respect_padding_idx(tokenizer):
    """SmolLM2's embedding has padding_idx = <|im_end|>: that row gets no input-side gradient."""
    model = MODELS["llama"](tied=True, dtype=torch.float64)
    model.model.embed_tokens.padding_idx = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bs = toy_batches(tokenizer, 6, 3)
    res = run_pass(bs, row_step(model, {}, "ghost", norms=True))
    assert rel_err(res.rows["sq_norms"], oracle_sq_norms(model, bs)) <= 1e-9


# ---- end to end: `dualsft score` with each variant against the explicit per-example formula ----

ETA = 1e-2
# end to end on the micro Llama: HF's LlamaRMSNorm rounds through float32 even in a float64 model, so a
# padded batch and a lone example round differently (test_scoring_rows.py's docstring); measured ≤ 1e-8
E2E_TOL = 1e-7


@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory):
    """A micro Llama (tied) + byte tokenizer saved as an HF folder, plus pool and target files."""
    import json

    from dualsft.testing import byte_tokenizer, micro_llama, toy_records

    d = tmp_path_factory.mktemp("variants")
    micro_llama(tied=True, seed=0).save_pretrained(str(d / "model"))
    byte_tokenizer().save_pretrained(str(d / "model"))
    for name, n, seed in (("pool", 10, 0), ("target", 5, 1)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_records(n, seed)))
    return d


def score_cli(d, run, *flags):
    """`dualsft score` at θ0, order 1, λ_prior 0 (u = η v_new), float64, the paper's formula (each variant is
    one change of it; ``flags`` come later and win); returns (rows, summary)."""
    from dualsft.cli import main as cli
    from dualsft.io import read_json, read_jsonl
    from dualsft.testing import paper_score_flags

    args = ["score", "--model", str(d / "model"), "--pool", str(d / "pool.jsonl"), "--target",
            str(d / "target.jsonl"), "--run-dir", str(run), "--max-length", "64", "--dtype", "float64",
            "--stats-dtype", "float64", "--order", "1", "--lambda-prior", "0", "--eta", str(ETA),
            *paper_score_flags(), *flags]
    assert cli(args) == 0
    return read_jsonl(run / "scores" / "data_scores.jsonl"), read_json(run / "scores" / "summary.json")


def oracle_split(d, name, loss_tokens):
    """Per-example float64 gradients of one split, one backward each, with ``loss_tokens`` labels."""
    from dualsft.data.formats import load_examples, tokenize_examples
    from dualsft.models import load_model, load_tokenizer

    tok = load_tokenizer(str(d / "model"))
    model = load_model(str(d / "model"), "float64", "cpu")
    toks = tokenize_examples(load_examples(d / f"{name}.jsonl"), tok, "chat", 64, loss_tokens=loss_tokens)
    return [g for b in batches(toks, 1, tok.pad_token_id) for g in oracle_grads(model, b)]


def dot(a, b) -> float:
    return sum(float((a[n] * b[n]).sum()) for n in a)


def oracle_rows(d, loss_tokens="response", target_gradient="mean", data_score="inner", scale=None,
                names=None) -> torch.Tensor:
    """φ_data by the explicit formulas: v_new (mean, or mean‖g‖ · mean g/‖g‖), u = η v_new (times ``scale``
    per entry: Adam's P, a dict, or a function of v giving it), ⟨u, g_n⟩ over ``names`` (default all)
    (/‖g_n‖)."""
    tg, pg = oracle_split(d, "target", loss_tokens), oracle_split(d, "pool", loss_tokens)
    norms = [dot(g, g) ** 0.5 for g in tg]
    if target_gradient == "mean":
        v = {n: sum(g[n] for g in tg) / len(tg) for n in tg[0]}
    else:
        mean_norm = sum(norms) / len(norms)
        v = {n: mean_norm * sum(g[n] / q for g, q in zip(tg, norms)) / len(tg) for n in tg[0]}
    if callable(scale):
        scale = scale(v)
    if scale is not None:
        v = {n: scale[n] * t for n, t in v.items()}
    if names is not None:
        v = {n: v[n] for n in names}
    inner = torch.tensor([ETA * dot(v, g) for g in pg], dtype=torch.float64)
    if data_score == "cosine":
        return inner / torch.tensor([dot(g, g) ** 0.5 for g in pg], dtype=torch.float64)
    return inner


def scores_of(rows, key="score") -> torch.Tensor:
    return torch.tensor([r[key] for r in rows], dtype=torch.float64)


def test_score_tokens_answer_matches_oracle(micro_folder, tmp_path):
    """--score-tokens answer: φ_data == ⟨η v_new, g_n⟩ with BOTH computed on answer-token labels; and it
    differs from the default (the chat template's end-of-turn tokens carry loss there)."""
    rows, summary = score_cli(micro_folder, tmp_path / "a", "--score-tokens", "answer")
    ref = oracle_rows(micro_folder, loss_tokens="answer")
    assert rel_err(scores_of(rows), ref) <= E2E_TOL
    assert summary["score_tokens"] == "answer"
    default, _ = score_cli(micro_folder, tmp_path / "r")
    assert rel_err(scores_of(default), oracle_rows(micro_folder)) <= E2E_TOL
    assert rel_err(scores_of(rows), scores_of(default)) > 1e-3
    from dualsft.scoring.settings import load_settings

    assert load_settings(tmp_path / "a" / "scores").score_tokens == "answer"


@pytest.mark.parametrize("method", ["ghost", "exact"])
def test_data_score_cosine_matches_oracle(micro_folder, tmp_path, method):
    """--data-score cosine: "score" = ⟨u, g_n⟩/‖g_n‖ with the exact ‖g_n‖ (tied Llama), "inner" the plain
    score, and the row-column identity still checked on the inner scores."""
    rows, summary = score_cli(micro_folder, tmp_path / "c", "--data-score", "cosine", "--method", method)
    assert rel_err(scores_of(rows), oracle_rows(micro_folder, data_score="cosine")) <= E2E_TOL
    assert rel_err(scores_of(rows, "inner"), oracle_rows(micro_folder)) <= E2E_TOL
    assert all(r["grad_norm"] > 0 for r in rows)
    assert summary["data_score"] == "cosine"
    assert abs(summary["sum_data"] - sum(r["inner"] for r in rows)) <= E2E_TOL * abs(summary["sum_data"])
    assert abs(summary["sum_data"] - summary["uTG"]) <= 1e-8 * abs(summary["uTG"])


@pytest.mark.parametrize("method", ["ghost", "exact"])
def test_target_gradient_normalized_matches_oracle(micro_folder, tmp_path, method):
    """--target-gradient normalized: v_new == (mean_q ‖g_q‖) · mean_q g_q/‖g_q‖ by the explicit formula."""
    rows, summary = score_cli(micro_folder, tmp_path / "n", "--target-gradient", "normalized", "--method", method)
    ref = oracle_rows(micro_folder, target_gradient="normalized")
    assert rel_err(scores_of(rows), ref) <= E2E_TOL
    assert rel_err(scores_of(rows), oracle_rows(micro_folder)) > 1e-3  # really another direction
    assert summary["target_gradient"] == "normalized" and summary["passes"][:2] == ["target_norms", "target"]
    assert summary["target_grad_norm"]["min"] > 0


def test_cosine_refuses_jvp():
    from dualsft.errors import ConfigError
    from dualsft.scoring.settings import ScoreConfig

    with pytest.raises(ConfigError, match="cosine"):
        ScoreConfig(data_score="cosine", method="jvp")


def test_precondition_adam_matches_oracle(micro_folder, tmp_path):
    """--precondition adam (order 1): φ_data == ⟨η P⊙v_new, g_n⟩ with P = 1/(√c + 1e-8) from a given c, one
    backward per example; the row-column identity holds; and it is another ranking than the paper's."""
    from dualsft.io import save_tensors
    from dualsft.models import load_model
    from dualsft.scoring.stats import trainable_params

    params = trainable_params(load_model(str(micro_folder / "model"), "float64", "cpu"))
    gen = torch.Generator().manual_seed(3)
    c = {n: torch.rand(p.shape, generator=gen, dtype=torch.float64).pow(4) * 1e-4 for n, p in params.items()}
    save_tensors(tmp_path / "c.safetensors", {n: t.float() for n, t in c.items()})
    rows, summary = score_cli(micro_folder, tmp_path / "p", "--precondition", "adam", "--curvature",
                              str(tmp_path / "c.safetensors"))
    P = {n: 1.0 / (t.float().double().sqrt() + 1e-8) for n, t in c.items()}
    ref = oracle_rows(micro_folder, scale=P)
    assert rel_err(scores_of(rows), ref) <= E2E_TOL
    assert abs(summary["sum_data"] - summary["uTG"]) <= 1e-8 * abs(summary["uTG"])
    assert summary["precondition"] == "adam"
    order = torch.argsort(scores_of(rows))
    assert not torch.equal(order, torch.argsort(oracle_rows(micro_folder)))


def test_precondition_adam_step_matches_oracle(micro_folder, tmp_path):
    """--precondition adam-step (order 1): φ_data == ⟨η P⊙v_new, g_n⟩ with P = 1/(√(0.999 c + 0.001 v_new²)
    + 1e-8), one backward per example; where c = 0 the scale stays bounded by 1/(√0.001 |v|), unlike adam's
    1/ε; the row-column identity holds; and the ranking differs from --precondition adam's."""
    from dualsft.io import save_tensors
    from dualsft.method import adam_scale, adam_step_scale
    from dualsft.models import load_model
    from dualsft.scoring.stats import trainable_params

    params = trainable_params(load_model(str(micro_folder / "model"), "float64", "cpu"))
    gen = torch.Generator().manual_seed(3)
    c = {n: torch.rand(p.shape, generator=gen, dtype=torch.float64).pow(4) * 1e-4 for n, p in params.items()}
    first = next(iter(c))
    c[first].view(-1)[: c[first].numel() // 3] = 0.0  # a third of one tensor the warm-up never moved
    save_tensors(tmp_path / "c.safetensors", {n: t.float() for n, t in c.items()})
    cf = {n: t.float().double() for n, t in c.items()}

    def step_scale(v):
        return {n: 1.0 / ((0.999 * cf[n] + 0.001 * v[n] ** 2).sqrt() + 1e-8) for n in v}

    rows, summary = score_cli(micro_folder, tmp_path / "s", "--precondition", "adam-step", "--curvature",
                              str(tmp_path / "c.safetensors"))
    assert rel_err(scores_of(rows), oracle_rows(micro_folder, scale=step_scale)) <= E2E_TOL
    assert abs(summary["sum_data"] - summary["uTG"]) <= 1e-8 * abs(summary["uTG"])
    assert summary["precondition"] == "adam-step"
    v = torch.tensor([1e-3, -2e-3])
    zero = torch.zeros(2)
    assert torch.allclose(adam_step_scale(zero, v), 1.0 / (0.001**0.5 * v.abs().double() + 1e-8))
    assert float(adam_scale(zero).max()) == pytest.approx(1e8)
    adam_rows, _ = score_cli(micro_folder, tmp_path / "a", "--precondition", "adam", "--curvature",
                             str(tmp_path / "c.safetensors"))
    assert not torch.equal(torch.argsort(scores_of(rows)), torch.argsort(scores_of(adam_rows)))


def test_precondition_refuses_without_curvature(micro_folder, tmp_path, caplog):
    """No warm-up and no --curvature: a typed ConfigError (the CLI exits non-zero and says what to do)."""
    from dualsft.cli import main as cli

    assert 0 != cli(["score", "--model", str(micro_folder / "model"), "--pool", str(micro_folder / "pool.jsonl"),
             "--target", str(micro_folder / "target.jsonl"), "--run-dir", str(tmp_path / "x"), "--order", "1",
             "--precondition", "adam"])
    assert "--precondition adam needs Adam's exp_avg_sq" in caplog.text


def test_data_params_linear_matches_oracle(micro_folder, tmp_path):
    """--data-params linear: φ_data == ⟨η v_new restricted to the linear layers, g_n⟩ (no embedding, no tied
    head, no norm); Σφ_data equals Σφ_param over those parameters (sum_param_rows), not the full uᵀG."""
    from dualsft.models import load_model
    from dualsft.scoring.layers import linear_weight_names

    names = linear_weight_names(load_model(str(micro_folder / "model"), "float64", "cpu"))
    assert names and not any("embed" in n or "norm" in n for n in names)
    rows, summary = score_cli(micro_folder, tmp_path / "l", "--data-params", "linear")
    assert rel_err(scores_of(rows), oracle_rows(micro_folder, names=names)) <= E2E_TOL
    assert abs(summary["sum_data"] - summary["sum_param_rows"]) <= 1e-8 * abs(summary["sum_param_rows"])
    assert abs(summary["sum_param_rows"] - summary["uTG"]) > 1e-6 * abs(summary["uTG"])
    assert summary["data_params"] == "linear"


def test_adam_step_u_order2_identity():
    """u = P⊙(ηv − ½η²c⊙P⊙G) written out by hand equals method.direction_u's, and Σ_j u_j G_j is the
    one-step surrogate of the Adam step Δ = −η P⊙G: η vᵀ(P⊙G) − ½η² Σ_j c_j (P_j G_j)²."""
    from dualsft.method import direction_u

    gen = torch.Generator().manual_seed(0)
    v, G = ({"w": torch.randn(5, 3, generator=gen, dtype=torch.float64)} for _ in range(2))
    c = {"w": torch.rand(5, 3, generator=gen, dtype=torch.float64)}
    eta = 0.3
    u = direction_u(v, eta, 2, c, G, precondition="adam")["w"]
    p = 1.0 / (c["w"].sqrt() + 1e-8)
    assert torch.allclose(u, p * (eta * v["w"] - 0.5 * eta**2 * c["w"] * p * G["w"]), rtol=1e-12, atol=0)
    surrogate = eta * (v["w"] * p * G["w"]).sum() - 0.5 * eta**2 * (c["w"] * (p * G["w"]) ** 2).sum()
    assert torch.allclose((u * G["w"]).sum(), surrogate, rtol=1e-12)


def test_score_loss_chunk_gives_the_same_scores(micro_folder, tmp_path, monkeypatch):
    """`dualsft score --loss-chunk 3` (the anchor pass without [B, T, V] logits) writes the scores of the
    full-logits run: same v (with v_prior, λ_prior 1) and φ_data in float64 up to rounding."""
    import shutil

    from dualsft.cli import main as cli
    from dualsft.io import load_tensors

    assert cli(["warmup", "--model", str(micro_folder / "model"), "--pool", str(micro_folder / "pool.jsonl"),
                "--run-dir", str(tmp_path / "w"), "--max-length", "64", "--dtype", "float64", "--warmup-ratio", "1",
                "--lr", "1e-2", "--batch-size", "5", "--micro-batch-size", "5"]) == 0
    for d in ("full", "chunk"):  # score at θw, so the anchor pass (KL to θ0) is not zero
        shutil.copytree(tmp_path / "w" / "warmup", tmp_path / d / "warmup")
    flags = ("--lambda-prior", "1", "--anchor-ratio", "0.5")
    full, s_full = score_cli(micro_folder, tmp_path / "full", *flags)
    from dualsft.scoring import prior

    calls = []
    real = prior.chunked_kl_and_weights
    monkeypatch.setattr(prior, "chunked_kl_and_weights", lambda *a: calls.append(a[-1]) or real(*a))
    chunked, _ = score_cli(micro_folder, tmp_path / "chunk", *flags, "--loss-chunk", "3")
    assert calls and set(calls) == {3}  # the anchor pass really ran chunked
    assert s_full["u_term_norms"]["eta_lambda_prior_v_prior"] > 0  # the anchor pass ran
    assert rel_err(scores_of(chunked), scores_of(full)) <= 1e-10
    v_full, v_chunk = (load_tensors(d / "scores" / "v.safetensors") for d in (tmp_path / "full", tmp_path / "chunk"))
    for n, t in v_full.items():
        assert torch.allclose(v_chunk[n], t, rtol=1e-10, atol=1e-14), n
