"""`dualsft export --format shira` and the model card of `dualsft merge`, end to end on micro Llamas
trained by `dualsft train` (a Linear-only mask on an untied model; a mask over everything on a tied one)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from train_helpers import random_mask

from dualsft.cli import main
from dualsft.io import read_json, write_json, write_jsonl
from dualsft.runs import build_metadata
from dualsft.selection.mask import save_mask
from dualsft.selection.report import subset_overlap
from dualsft.selection.select import SelectConfig
from dualsft.testing import byte_tokenizer, micro_llama, one_torch_thread, toy_records
from dualsft.training.card import CardInputs, command_line, model_card, read_card_inputs
from dualsft.training.delta import apply_delta
from dualsft.training.merge import MergeConfig


def make_run(root, tied: bool, skip: tuple[str, ...]):
    """RUN/ with data/pool.jsonl, a selection folder as `dualsft select` writes it, and a finished train/."""
    model_dir, run = root / "model", root / "run"
    model = micro_llama(tied=tied)
    model.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    pool = [{**r, "task": "add" if i % 3 else "add_ok"} for i, r in enumerate(toy_records(12))]
    write_jsonl(run / "data" / "pool.jsonl", pool)
    subset = [{**r, "index": i, "score": 1.0} for i, r in enumerate(pool) if i % 2 == 0]
    sel = run / "selection"
    write_jsonl(sel / "subset.jsonl", subset)
    mask = random_mask(model, 0.05, skip=skip)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    save_mask(sel / "mask.safetensors", mask, shapes)
    k, d = sum(v.numel() for v in mask.values()), sum(p.numel() for p in model.parameters())
    write_json(sel / "summary.json", {
        "data": {"budget": 0.5, "b": 6, "N": 12, "selected": 6, "chosen_by": "top-b of phi_data",
                 "overlap": subset_overlap(pool, subset)},
        "param": {"budget": 0.05, "k": k, "d": d, "selected": k, "quota_layer": 0.2, "quota_module": 0.2,
                  "granularity": "element"}})
    write_json(sel / "metadata.json", build_metadata("selection", SelectConfig(run_dir=str(run), data_budget=0.5,
                                                                               param_budget=0.05)))
    assert main(["train", "--run-dir", str(run), "--model", str(model_dir), "--batch-size", "4", "--micro-batch-size",
                 "2", "--epochs", "1", "--lr", "1e-2", "--max-length", "64", "--no-progress",
                 "--attn-implementation", "eager"]) == 0
    return run, model_dir, k, d


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    with one_torch_thread():
        return make_run(tmp_path_factory.mktemp("untied"), False, ("norm", "embed"))


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    with one_torch_thread():
        return make_run(tmp_path_factory.mktemp("tied"), True, ())


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randint(0, 259, (2, 13), generator=torch.Generator().manual_seed(0))).logits


def test_export_matches_merge_and_merge_writes_the_card(untied) -> None:
    from peft import PeftModel

    run, model_dir, k, d = untied
    assert main(["merge", "--run-dir", str(run), "--overwrite"]) == 0
    assert main(["export", "--run-dir", str(run), "--format", "shira", "--overwrite"]) == 0
    out = run / "export-shira"
    assert {"adapter_config.json", "adapter_model.safetensors", "export.json", "metadata.json"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "dualsft_rest.safetensors").exists()
    got = logits(PeftModel.from_pretrained(load(model_dir), str(out)))
    assert (got - logits(load(run / "merged"))).abs().max().item() <= 1e-6

    record = read_json(out / "export.json")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == record["r"]
    assert record["left_out"] == {} and record["rest_file"] is None and record["totals"]["selected"] == k
    layers = record["layers"]
    assert record["r"] == max(-(-v["selected"] // sum(v["shape"])) for v in layers.values())
    for v in layers.values():
        assert v["entries"] == record["r"] * sum(v["shape"]) == v["selected"] + v["padding"]

    card = (run / "merged" / "README.md").read_text()
    for text in ("DualSFT", "docs/method.md", "6 of 12 pool examples (budget 0.5", f"{k:,} of {d:,} weight entries",
                 "budget 0.05", "| add | 8 |", "| add_ok | 4 |", "dualsft select --run-dir", "--data-budget 0.5",
                 "dualsft train --run-dir", "--lr 0.01", f"dualsft merge --run-dir {run}"):
        assert text in card, text
    assert "## Evaluation" not in card  # no eval stage in this run folder


def test_tied_run_is_refused_then_exported_with_partial(tied, caplog) -> None:
    from peft import PeftModel

    run, model_dir, _, _ = tied
    out = run / "shira"
    assert main(["export", "--run-dir", str(run), "--out", str(out)]) == 2
    assert "ExportError" in caplog.text and "model.embed_tokens.weight (tied weight" in caplog.text
    assert not out.exists()
    assert main(["export", "--run-dir", str(run), "--out", str(out), "--partial"]) == 0
    record = read_json(out / "export.json")
    assert record["rest_file"] == "dualsft_rest.safetensors" and "model.embed_tokens.weight" in record["left_out"]
    assert "model.norm.weight" in record["left_out"]
    base = apply_delta(load(model_dir), out / "dualsft_rest.safetensors")  # the rest first (fingerprint-checked)
    got = logits(PeftModel.from_pretrained(base, str(out)))
    assert (got - logits(apply_delta(load(model_dir), run / "train"))).abs().max().item() <= 1e-6


def test_bad_or_mismatched_artifacts_give_typed_errors(untied, tmp_path, caplog) -> None:
    run, model_dir, _, _ = untied
    assert main(["export", "--run-dir", str(tmp_path / "empty")]) == 2
    assert "ArtifactError" in caplog.text and "adapter.json" in caplog.text

    caplog.clear()
    write_json(tmp_path / "lora" / "adapter.json", {"complete": True, "method": "lora"})
    assert main(["export", "--train-dir", str(tmp_path / "lora"), "--out", str(tmp_path / "x")]) == 2
    assert "ExportError" in caplog.text and "already is a peft adapter" in caplog.text

    caplog.clear()
    bad = tmp_path / "train-bad"
    shutil.copytree(run / "train", bad)
    info = read_json(bad / "adapter.json")
    write_json(bad / "adapter.json", {**info, "base_model": {**info["base_model"], "fingerprint": "0" * 16}})
    assert main(["export", "--train-dir", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "MetadataMismatchError" in caplog.text and "different runs" in caplog.text

    caplog.clear()
    other = tmp_path / "other-model"
    micro_llama(tied=False, seed=1).save_pretrained(other)
    assert main(["export", "--run-dir", str(run), "--model", str(other), "--out", str(tmp_path / "x")]) == 2
    assert "MetadataMismatchError" in caplog.text and "fingerprint" in caplog.text

    caplog.clear()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["export", "--run-dir", str(run), "--out", str(tmp_path / "full")]) == 2
    assert "already exists" in caplog.text
    assert not (tmp_path / "x").exists()


def test_card_shows_the_eval_of_this_training_run_only(untied, tmp_path) -> None:
    from dualsft.evaluation.evaluate import run_fingerprint

    run, _, _, _ = untied
    stat = {"accuracy": {"mean": 0.5, "std": 0.1, "n": 4}, "loss": {"mean": 1.25, "std": 0.5, "n": 4}}
    write_json(run / "eval" / "metrics.json", {"models": {"base": {"target": {"accuracy": {"mean": 0.25, "n": 4}}},
                                                          "tuned": {"target": stat}}})
    write_json(run / "eval" / "metadata.json", {"config": {"run_dir": str(run), "batch_size": 4},
                                                "train_dirs": {str(run / "train"): run_fingerprint(run / "train")}})
    try:
        card = model_card(read_card_inputs(run, run / "train", "dualsft merge"))
        assert "## Evaluation" in card and "| target accuracy (exact match) | 25.0% (n=4) | 50.0% ± 10.0% (n=4) |" in card
        assert "dualsft eval --run-dir" in card and "--batch-size 4" in card
        write_json(run / "eval" / "metadata.json", {"train_dirs": {str(run / "train"): "another-delta"}})
        assert "## Evaluation" not in model_card(read_card_inputs(run, run / "train", "dualsft merge"))
    finally:
        shutil.rmtree(run / "eval")


def test_card_text_for_baselines_and_hub_models() -> None:
    train = {"method": "lora", "weights_dtype": "bfloat16", "mask": {"kind": "lora", "d": 1000},
             "training": {"lora_r": 16, "lora_alpha": 32, "data": "all", "lr": 2e-4},
             "result": {"steps": 3, "tokens": 99, "final_loss": 1.5}}
    card = model_card(CardInputs("HuggingFaceTB/SmolLM2-135M-Instruct", train, hub_base=True))
    assert card.startswith("---\nlibrary_name: transformers\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "LoRA r=16, alpha=32" in card and "every example of the training file" in card
    assert "## How it was made" not in card and "## Training subset" not in card
    full = {**train, "method": "full", "mask": {"kind": "full", "d": 1000}}
    assert "all 1,000 entries (full fine-tuning" in model_card(CardInputs("/models/x", full))
    assert "base_model:" not in model_card(CardInputs("/models/x", full))


def test_command_line_lists_only_options_that_differ_from_the_defaults() -> None:
    cfg = {"run_dir": "runs/my run", "train_dir": None, "overwrite": True, "dtype": "bfloat16", "out": None,
           "model": None}
    assert command_line("merge", MergeConfig, cfg) == "dualsft merge --run-dir 'runs/my run' --dtype bfloat16 --overwrite"
    assert command_line("merge", MergeConfig, {"run_dir": "runs/default"}) == "dualsft merge"
