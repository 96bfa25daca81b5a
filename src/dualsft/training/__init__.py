"""Restricted fine-tuning (docs/method.md §5 step 5, §7): sparse AdamW whose memory scales with the mask,
its dense-masked reference twin, full FT and LoRA baselines through one explicit loop, sparse delta
artifacts and merging.

Public API (stable):
    train_restricted, TrainSettings, TrainResult       (dualsft.training.loop)
    SparseAdamW, DenseAdamW, AdamWHyper                 (dualsft.training.optim)
    apply_delta, extract_delta, save_delta, load_delta, SparseDelta   (dualsft.training.delta)
"""

from dualsft.training.delta import SparseDelta, apply_delta, extract_delta, load_delta, save_delta
from dualsft.training.loop import TrainResult, TrainSettings, train_restricted
from dualsft.training.optim import AdamWHyper, DenseAdamW, SparseAdamW

__all__ = ["AdamWHyper", "DenseAdamW", "SparseAdamW", "SparseDelta", "TrainResult", "TrainSettings", "apply_delta",
           "extract_delta", "load_delta", "save_delta", "train_restricted"]
