"""`dualsft merge`: base model θ0 + trained delta (or LoRA adapter) -> a full Hugging Face model folder.

    dualsft merge --run-dir runs/demo                  # RUN/train -> RUN/merged
    dualsft merge --train-dir runs/demo/train --out my-model --model smollm2-135m

The folder loads with ``AutoModelForCausalLM.from_pretrained`` and holds the tokenizer too, and a model card
README.md (budgets, subset composition, eval metrics, command lines: dualsft.training.card).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from dualsft.config import opt
from dualsft.errors import ArtifactError
from dualsft.io import atomic_write_text, read_json

HELP = "merge a trained delta (or LoRA adapter) into the base model and save a full HF model folder"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeConfig:
    """Options of `dualsft merge`."""

    run_dir: str = opt("runs/default", "run folder (reads RUN/train, writes RUN/merged)")
    train_dir: str | None = opt(None, "the training output folder; default RUN/train")
    model: str | None = opt(None, "base model id or folder; default: the one recorded in adapter.json")
    dtype: str | None = opt(None, "weight dtype; default: the dtype training used")
    out: str | None = opt(None, "output folder; default RUN/merged")
    overwrite: bool = opt(False, "replace an existing output folder")


CONFIG = MergeConfig


def main(cfg: MergeConfig) -> int:
    """Load θ0, apply the delta (fingerprint-checked), save_pretrained model + tokenizer + model card atomically."""
    from dualsft.models import load_model, load_tokenizer
    from dualsft.training.card import command_line, model_card, read_card_inputs
    from dualsft.training.delta import apply_delta

    train_dir = Path(cfg.train_dir) if cfg.train_dir else Path(cfg.run_dir) / "train"
    info = read_json(train_dir / "adapter.json")
    if not info.get("complete"):
        raise ArtifactError(f"{train_dir} holds no finished training run: rerun `dualsft train`")
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / "merged"
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite or choose another --out")
    card = model_card(read_card_inputs(Path(cfg.run_dir), train_dir, command_line("merge", MergeConfig, asdict(cfg))))
    model_id = cfg.model or info["base_model"]["id"]
    model = load_model(model_id, cfg.dtype or info.get("weights_dtype", "float32"), "cpu")
    model = apply_delta(model, train_dir)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    load_tokenizer(model_id).save_pretrained(str(tmp))
    atomic_write_text(tmp / "README.md", card)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("wrote merged model %s (base %s + %s)", out, model_id, info.get("artifact"))
    return 0
