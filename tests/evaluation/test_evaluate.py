"""`dualsft eval` on a micro model: deterministic metrics, loss parity with losses.per_example_loss, KL."""

from __future__ import annotations

import dataclasses

import pytest

from dualsft.cli import main as cli_main
from dualsft.data.build import DataBuildConfig, build_splits
from dualsft.data.formats import collate, load_examples, tokenize_examples
from dualsft.evaluation.evaluate import EvalConfig, evaluate_model, load_eval_sets, losses_and_kl
from dualsft.io import read_json, read_jsonl, write_jsonl
from dualsft.losses import per_example_loss
from dualsft.testing import micro_gpt2, micro_llama

CFG = EvalConfig(max_length=200, batch_size=4, max_new_tokens=4)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny real splits: 5 chain_sum test items, 2 items of two other tasks, one short code record."""
    d = tmp_path_factory.mktemp("data")
    s = build_splits(DataBuildConfig(pool_size=4, val_size=1, test_size=5, stability_size=2, humaneval_size=0,
                                     pool_tasks="chain_sum,gcd,leg_counting"))
    code = {"prompt": "def add(a, b):\n", "completion": "    return a + b\n", "task": "humaneval",
            "humaneval": {"task_id": "toy/0", "entry_point": "add",
                          "test": "def check(c):\n    assert c(2, 3) == 5\n"}}
    write_jsonl(d / "test.jsonl", s["test"])
    write_jsonl(d / "stability.jsonl", s["stability"] + [{"index": len(s["stability"]), **code}])
    return d


def test_load_eval_sets(data_dir):
    sets = load_eval_sets(data_dir)
    assert sets.target_task == "chain_sum" and len(sets.target) == 5
    assert set(sets.stability) == {"gcd", "leg_counting"} and set(sets.general) == {"humaneval"}
    assert len(load_eval_sets(data_dir, max_examples=2).target) == 2


def test_metrics_deterministic_and_complete(data_dir, tokenizer):
    model, base = micro_llama(seed=1), micro_llama(seed=2)
    a = evaluate_model(model, tokenizer, base, data_dir, CFG)
    b = evaluate_model(model, tokenizer, base, data_dir, CFG)
    assert a == b
    m = a["metrics"]
    assert m["target"]["task"] == "chain_sum"
    for key in ("loss", "accuracy", "score", "kl"):
        assert m["target"][key]["n"] == 5
    assert m["stability"]["all"]["accuracy"]["n"] == 4 and m["stability"]["gcd"]["loss"]["n"] == 2
    assert set(m["general"]["humaneval"]) == {"loss", "kl"} and m["general"]["humaneval"]["kl"]["mean"] > 0
    assert m["general"]["all"] == m["general"]["humaneval"]  # pooled over general sets (one here)
    rows = a["predictions"]
    assert len(rows) == 5 + 4 + 1 and all(len(r["generation"]) <= 4 * 4 for r in rows if "generation" in r)


@pytest.mark.parametrize("make", [micro_llama, micro_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("split", ["test", "stability"])
def test_loss_matches_per_example_loss_and_kl_self_is_zero(data_dir, tokenizer, make, split):
    # left padding + logits of the response window only; GPT-2's absolute positions check position_ids
    model = make(seed=1)
    exs = load_examples(data_dir / f"{split}.jsonl")
    loss, kl = losses_and_kl(model, tokenizer, exs, CFG, base_model=model)
    toks = tokenize_examples(exs, tokenizer, CFG.template, CFG.max_length)
    assert len(loss) == len(toks)
    for t in toks:
        ref = per_example_loss(model, collate([t], tokenizer.pad_token_id)).item()
        assert loss[t.index] == pytest.approx(ref, rel=1e-5)
    assert max(kl.values()) == 0.0


def test_humaneval_pass_at_1_runs_in_subprocess(data_dir, tokenizer):
    cfg = dataclasses.replace(CFG, humaneval=True, humaneval_max_new_tokens=8, humaneval_timeout=5.0)
    res = evaluate_model(micro_llama(seed=1), tokenizer, None, data_dir, cfg)
    he = res["metrics"]["general"]["humaneval"]
    assert he["pass@1"] == {"mean": 0.0, "std": 0.0, "n": 1}  # a random model does not pass
    assert "kl" not in he


def test_cli_writes_metrics_predictions_metadata(data_dir, micro_model_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--model", str(micro_model_dir), "--data-dir", str(data_dir), "--out", str(out),
            "--max-length", "200", "--batch-size", "4", "--max-new-tokens", "3", "--train-dir", "none",
            "--base-model", str(micro_model_dir)]
    assert cli_main(args) == 0
    m = read_json(out / "metrics.json")
    assert set(m["models"]) == {"tuned", "base"}
    # the same weights as tuned and base: identical metrics, and KL(base ‖ base) = 0
    assert m["models"]["tuned"]["target"]["accuracy"] == m["models"]["base"]["target"]["accuracy"]
    assert m["models"]["tuned"]["general"]["humaneval"]["kl"]["mean"] == 0.0
    preds = read_jsonl(out / "predictions.jsonl")
    assert {p["model"] for p in preds} == {"tuned", "base"} and len(preds) == 2 * 10
    meta = read_json(out / "metadata.json")
    assert meta["stage"] == "eval" and set(meta["data"]) == {"test", "stability"}
    assert cli_main(["eval", "--model", str(micro_model_dir), "--data-dir", str(tmp_path / "nothing"),
                     "--out", str(tmp_path / "e2"), "--train-dir", "none"]) == 2


def save_perturbed_delta(model_dir, train_dir, shift: float) -> None:
    """A delta.safetensors that moves 64 entries of one weight of the micro model by ``shift``."""
    delta_mod = pytest.importorskip("dualsft.training.delta")
    import torch

    from dualsft.models import load_model, model_fingerprint

    base = load_model(str(model_dir), attn_implementation="sdpa")
    fp = model_fingerprint(base)
    name = "model.layers.0.mlp.down_proj.weight"
    idx = torch.arange(0, 64, dtype=torch.int64)
    with torch.no_grad():
        dict(base.named_parameters())[name].view(-1)[idx] += shift
    delta = delta_mod.extract_delta(base, {name: idx}, base_model=str(model_dir), base_fingerprint=fp)
    delta_mod.save_delta(train_dir / "delta.safetensors", delta)


def test_cli_applies_a_trained_delta(data_dir, micro_model_dir, tmp_path):
    save_perturbed_delta(micro_model_dir, tmp_path / "train", 0.5)
    out = tmp_path / "eval"
    assert cli_main(["eval", "--model", str(micro_model_dir), "--data-dir", str(data_dir), "--out", str(out),
                     "--run-dir", str(tmp_path), "--max-length", "200", "--batch-size", "8",
                     "--max-new-tokens", "2", "--no-eval-base"]) == 0  # --train-dir auto finds RUN/train
    m = read_json(out / "metrics.json")["models"]
    assert set(m) == {"tuned"} and m["tuned"]["general"]["humaneval"]["kl"]["mean"] > 0


def test_cli_several_runs_gives_mean_and_std_across_runs(data_dir, micro_model_dir, tmp_path):
    save_perturbed_delta(micro_model_dir, tmp_path / "s0", 0.5)
    save_perturbed_delta(micro_model_dir, tmp_path / "s1", -0.5)
    out = tmp_path / "eval"
    assert cli_main(["eval", "--model", str(micro_model_dir), "--data-dir", str(data_dir), "--out", str(out),
                     "--train-dir", f"{tmp_path / 's0'},{tmp_path / 's1'}", "--max-length", "200",
                     "--batch-size", "8", "--max-new-tokens", "2", "--no-eval-base"]) == 0
    m = read_json(out / "metrics.json")
    losses = [m["models"][f"tuned:{tmp_path / s}"]["target"]["loss"]["mean"] for s in ("s0", "s1")]
    agg = m["across_runs"]["target"]["loss"]
    assert agg["n"] == 2 and agg["n_per_run"] == [5, 5] and agg["mean"] == pytest.approx(sum(losses) / 2)
    assert agg["std"] > 0
