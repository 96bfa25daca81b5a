"""dualsft.integrations with a REAL transformers Trainer and TRL SFTTrainer on a micro run folder: only the
selected entries move, the loss falls, the scheduler drives the optimizer's lr, and the Trainer path equals
`dualsft train`'s loop step for step (same batches, clipping, weight decay, gradient accumulation)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import random_mask

from dualsft.data.formats import load_examples, tokenize_examples
from dualsft.errors import ArtifactError, NonFiniteLossError
from dualsft.integrations import (
    example_mean_loss,
    load_selection,
    sparse_optimizer,
    subset_dataset,
    trainer_collator,
)
from dualsft.io import write_json, write_jsonl
from dualsft.runs import build_metadata
from dualsft.selection.mask import save_mask
from dualsft.testing import byte_tokenizer, micro_gpt2, micro_llama, toy_records
from dualsft.training.loop import TrainSettings, train_restricted

pytest.importorskip("datasets")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory, micro_model_dir) -> Path:
    """RUN/ as `dualsft select` leaves it: selection/{subset.jsonl, mask.safetensors, metadata.json} (the model
    is the micro Llama of ``micro_model_dir``), and scores/metadata.json recording template and max_length.
    4 examples; the mask holds 5% of every tensor except the norms (which stay wholly frozen)."""
    run = tmp_path_factory.mktemp("integ") / "run"
    model = micro_llama(tied=True, seed=0)
    subset = [{**r, "index": i, "score": 1.0} for i, r in enumerate(toy_records(12)) if i % 3 == 0]
    write_jsonl(run / "selection" / "subset.jsonl", subset)
    save_mask(run / "selection" / "mask.safetensors", random_mask(model, 0.05, skip=("norm",)),
              {n: tuple(p.shape) for n, p in model.named_parameters()})
    write_json(run / "selection" / "metadata.json", build_metadata("selection", {}, str(micro_model_dir)))
    write_json(run / "scores" / "metadata.json", build_metadata("scores", {"template": "chat", "max_length": 64}))
    return run


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def check_only_mask_moved(model: torch.nn.Module, before: dict[str, torch.Tensor], run: Path) -> int:
    """Every entry outside the mask bit-identical; returns how many selected entries changed."""
    indices = load_selection(run).indices
    changed = 0
    for n, p in model.named_parameters():
        outside = torch.ones(p.numel(), dtype=torch.bool)
        if n in indices:
            outside[indices[n]] = False
        now, then = p.detach().view(-1), before[n].view(-1)
        assert torch.equal(now[outside], then[outside]), n
        changed += int(now.ne(then).sum())
    return changed


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def common_args(out: Path, **kw):
    return dict(output_dir=str(out), report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
                disable_tqdm=True, max_grad_norm=0, bf16=False, **kw)


def test_trainer_trains_only_the_selected_entries(run, tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    tok, model = byte_tokenizer(), micro_llama(tied=True, seed=0)
    before = snapshot(model)
    lr, steps = 3e-2, 4
    opt = sparse_optimizer(model, run, lr=lr, weight_decay=0.1, max_grad_norm=1.0)
    args = TrainingArguments(**common_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                           num_train_epochs=steps, lr_scheduler_type="linear"))
    trainer = Trainer(model, args, train_dataset=subset_dataset(run, tok), data_collator=trainer_collator(tok.pad_token_id),
                      optimizers=(opt, None), compute_loss_func=example_mean_loss(4))
    trainer.train()
    assert 0 < check_only_mask_moved(model, before, run) <= load_selection(run).k
    curve = losses(trainer)
    assert len(curve) == steps and curve[-1] < curve[0] - 0.05, curve
    # Trainer's scheduler writes our param_groups' lr (the optimizer's own lr is the peak)
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([lr * (1 - s / steps) for s in range(steps)])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0) and opt.last_grad_norm > 0
    frozen = [n for n, p in model.named_parameters() if "norm" in n]
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)


def test_trainer_equals_dualsft_train_step_for_step(run, tmp_path) -> None:
    """Same examples per step (sequential order on both sides), 2 examples per step in micro-batches of 1,
    clipping active (norms > 0.5), weight decay 0.1: the weights after 4 steps agree to 1e-6."""
    from transformers import Trainer, TrainingArguments

    tok = byte_tokenizer()
    toks = tokenize_examples(load_examples(run / "selection" / "subset.jsonl"), tok, "chat", 64)
    settings = TrainSettings(lr=1e-2, weight_decay=0.1, batch_size=2, micro_batch_size=1, epochs=2, max_grad_norm=0.5,
                             checkpoint_every=0, progress=False)
    ref = train_restricted(micro_llama(tied=True, seed=0), toks, load_selection(run).indices, settings,
                           tok.pad_token_id, order=lambda n, seed, epoch: list(range(n)))
    model = micro_llama(tied=True, seed=0)
    opt = sparse_optimizer(model, run, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5)
    args = TrainingArguments(**common_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                                           num_train_epochs=2, lr_scheduler_type="constant",
                                           train_sampling_strategy="sequential"))
    trainer = Trainer(model, args, train_dataset=subset_dataset(run, tok), data_collator=trainer_collator(tok.pad_token_id),
                      optimizers=(opt, None), compute_loss_func=example_mean_loss(2))
    trainer.train()
    assert max(m["grad_norm"] for m in ref.metrics) > 0.5  # the clip did something
    assert losses(trainer) == pytest.approx([m["loss"] for m in ref.metrics], abs=1e-6)
    assert opt.last_grad_norm == pytest.approx(ref.metrics[-1]["grad_norm"], abs=1e-6)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.model.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6, msg=n)


def test_trainer_checkpoint_resumes_to_the_uninterrupted_result(run, tmp_path) -> None:
    """Trainer saves our optimizer's state in its checkpoints; resuming from step 2 of 4 ends bit-identical."""
    from transformers import Trainer, TrainingArguments

    tok = byte_tokenizer()

    def trainer(out: Path, save: bool) -> tuple[torch.nn.Module, Trainer]:
        model = micro_llama(tied=True, seed=0)
        opt = sparse_optimizer(model, run, lr=1e-2, weight_decay=0.1)
        args = TrainingArguments(**{**common_args(out, per_device_train_batch_size=2, num_train_epochs=2,
                                                  lr_scheduler_type="linear", save_steps=2),
                                    "save_strategy": "steps" if save else "no"})
        return model, Trainer(model, args, train_dataset=subset_dataset(run, tok),
                              data_collator=trainer_collator(tok.pad_token_id), optimizers=(opt, None),
                              compute_loss_func=example_mean_loss(2))

    clean, t = trainer(tmp_path / "clean", save=False)
    t.train()
    trainer(tmp_path / "ckpt", save=True)[1].train()
    resumed, t = trainer(tmp_path / "ckpt", save=True)
    t.train(resume_from_checkpoint=str(tmp_path / "ckpt" / "checkpoint-2"))
    for (n, p), (_, q) in zip(resumed.named_parameters(), clean.named_parameters()):
        assert torch.equal(p, q), n


def test_sft_trainer_trains_only_the_selected_entries(run, tmp_path) -> None:
    """SFTTrainer tokenises subset_dataset's conversational prompt/completion rows itself: to the same ids and
    labels as dualsft's tokenisation (chat template)."""
    trl = pytest.importorskip("trl")
    tok, model = byte_tokenizer(), micro_llama(tied=True, seed=0)
    before = snapshot(model)
    opt = sparse_optimizer(model, run, lr=3e-2, weight_decay=0.1)
    args = trl.SFTConfig(**common_args(tmp_path, per_device_train_batch_size=4, num_train_epochs=4,
                                       lr_scheduler_type="constant"), max_length=64, packing=False)
    text = subset_dataset(run)
    assert text[0]["prompt"][0]["role"] == "user" and text[0]["completion"][0]["role"] == "assistant"
    trainer = trl.SFTTrainer(model, args, train_dataset=text, processing_class=tok, optimizers=(opt, None))
    ours = subset_dataset(run, tok)
    assert trainer.train_dataset["input_ids"] == ours["input_ids"] and trainer.train_dataset["labels"] == ours["labels"]
    trainer.train()
    assert 0 < check_only_mask_moved(model, before, run)
    curve = losses(trainer)
    assert len(curve) == 4 and curve[-1] < curve[0] - 0.05, curve


def test_sft_trainer_takes_the_pretokenised_subset_as_is(run, tmp_path) -> None:
    trl = pytest.importorskip("trl")
    tok = byte_tokenizer()
    ours = subset_dataset(run, tok)
    args = trl.SFTConfig(**common_args(tmp_path), max_length=64, packing=False)
    trainer = trl.SFTTrainer(micro_llama(tied=True, seed=0), args, train_dataset=ours, processing_class=tok)
    assert trainer.train_dataset["labels"] == ours["labels"] and trainer.train_dataset["input_ids"] == ours["input_ids"]


def test_subset_dataset_text_rows_for_the_plain_template(run) -> None:
    rows = subset_dataset(run, template="plain")
    assert rows[0]["prompt"].endswith("\n") and rows["index"] == [0, 3, 6, 9]
    assert "completion" in rows.column_names


def test_sparse_optimizer_refuses_another_architecture_and_a_missing_selection(run, tmp_path) -> None:
    with pytest.raises(ArtifactError, match="mask names parameter .* which this model does not have"):
        sparse_optimizer(micro_gpt2(), run)
    with pytest.raises(ArtifactError, match="dualsft select"):
        sparse_optimizer(micro_llama(), tmp_path)
    with pytest.raises(ArtifactError, match="dualsft select"):
        subset_dataset(tmp_path)


def test_non_finite_gradient_raises_before_any_weight_moves(run) -> None:
    model = micro_llama(tied=True, seed=0)
    opt = sparse_optimizer(model, run)
    before = snapshot(model)
    name, p = opt.named[0]
    p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm"):
        opt.step()
    assert all(torch.equal(q.detach(), before[n]) for n, q in model.named_parameters())


def test_missing_datasets_names_the_extra(run, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r'pip install "dualsft\[trl\]"'):
        subset_dataset(run)


@pytest.mark.parametrize("trainer", ["trainer", "sft"])
def test_example_script_trains_and_saves(run, tmp_path, micro_model_dir, trainer) -> None:
    if trainer == "sft":
        pytest.importorskip("trl")
    spec = importlib.util.spec_from_file_location("train_with_trainer", ROOT / "examples" / "train_with_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "out"
    assert example.main(["--run-dir", str(run), "--trainer", trainer, "--out", str(out), "--lr", "1e-2",
                         "--batch-size", "2", "--max-steps", "2"]) == 0  # the model: the selection's metadata
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    assert 0 < check_only_mask_moved(trained, snapshot(base), run)
    assert (out / "tokenizer_config.json").exists()
