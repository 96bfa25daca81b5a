"""Train a dualsft selection (RUN/selection: subset.jsonl + mask.safetensors) with transformers' Trainer or
TRL's SFTTrainer, updating only the selected entries on the selected examples, and save the model.

    python examples/train_with_trainer.py --run-dir runs/demo --trainer trainer --out runs/demo/trainer
    python examples/train_with_trainer.py --run-dir runs/demo --trainer sft --out runs/demo/sft   # pip install "dualsft[trl]"

The model defaults to the one the selection was scored with (RUN/selection/metadata.json). Trainer's own
gradient clipping is off (max_grad_norm=0): the optimizer clips over the selected entries itself
(see dualsft/integrations.py for why).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dualsft.integrations import example_mean_loss, run_setting, sparse_optimizer, subset_dataset, trainer_collator
from dualsft.models import load_model, load_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="dualsft run folder holding selection/")
    p.add_argument("--trainer", choices=("trainer", "sft"), default="trainer",
                   help="trainer: transformers.Trainer on dualsft's tokenisation; sft: TRL SFTTrainer tokenising itself")
    p.add_argument("--out", required=True, help="where the trained model (HF folder) is saved")
    p.add_argument("--model", default=None, help="base model; default: the selection's model")
    p.add_argument("--selection", default="selection", help="selection folder inside --run-dir")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate of the selected entries")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip norm over the selected entries (0: off)")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="examples per device and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-length", type=int, default=None, help="default: what the run used, else 256")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: epochs decide)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def selection_model(run_dir: Path, selection: str) -> str:
    """The model id recorded by `dualsft select` (the scores' model)."""
    meta = run_dir / selection / "metadata.json"
    model = json.loads(meta.read_text())["model"]["id"] if meta.exists() else None
    if not model:
        sys.exit(f"{meta} records no model; pass --model")
    return model


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    run = Path(a.run_dir)
    model_id = a.model or selection_model(run, a.selection)
    max_length = a.max_length or run_setting(run, "max_length", 256)
    tok = load_tokenizer(model_id)
    model = load_model(model_id, attn_implementation="sdpa")
    opt = sparse_optimizer(model, run, lr=a.lr, weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm,
                           selection=a.selection)
    common = dict(output_dir=a.out, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=a.grad_accum,
                  num_train_epochs=a.epochs, max_steps=a.max_steps, max_grad_norm=0,  # the optimizer clips
                  lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", seed=a.seed,
                  bf16=torch.cuda.is_available())  # as `dualsft train`: bf16 autocast on CUDA only
    if a.trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, max_length=max_length, packing=False)
        trainer = SFTTrainer(model, args, train_dataset=subset_dataset(run, selection=a.selection),
                             processing_class=tok, optimizers=(opt, None))
    else:
        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(**common)
        ds = subset_dataset(run, tok, max_length=max_length, selection=a.selection)
        trainer = Trainer(model, args, train_dataset=ds, data_collator=trainer_collator(tok.pad_token_id),
                          optimizers=(opt, None), compute_loss_func=example_mean_loss(a.batch_size * a.grad_accum))
    trainer.train()
    opt.remove_hooks()  # the model is an ordinary model again
    trainer.save_model(a.out)
    tok.save_pretrained(a.out)
    print(f"saved the trained model to {a.out} (last grad norm over the selected entries: {opt.last_grad_norm})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
