"""LoRA through peft, the parameter-efficient baseline (defaults r=16, alpha=32, dropout 0.05, all linear)."""

from __future__ import annotations

import torch


def wrap_lora(model: torch.nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.05,
              target_modules: str | list[str] = "all-linear") -> torch.nn.Module:
    """Return a peft model with LoRA adapters on ``target_modules`` ("all-linear": every linear layer
    except the output head, as peft defines it; GPT-2's Conv1D layers included). Base weights frozen."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, cfg)
