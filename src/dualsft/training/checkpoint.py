"""Resumable training checkpoints (safetensors + JSON, written atomically).

Layout under the checkpoint folder:
    step-000004/state.safetensors   ``param::<name>`` trained values ([k] for sparse, full tensors otherwise),
                                    ``opt::<name>::exp_avg|exp_avg_sq|step`` optimizer state,
                                    ``rng::cpu`` (and ``rng::cuda``) random generator states (uint8)
    step-000004/state.json          step, tokens, elapsed seconds, per-step metrics, settings
    latest.json                     {"step": 4, "dir": "step-000004"}: written LAST, so a crash mid-save
                                    leaves the previous checkpoint in charge; older step folders are then removed.
The data position needs no state: the order is a seeded permutation per epoch (see ``loop.step_examples``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from dualsft.errors import MetadataMismatchError
from dualsft.io import load_tensors, read_json, save_tensors, write_json
from dualsft.runs import first_difference

LATEST = "latest.json"


def save_checkpoint(folder: Path, updater: Any, state: dict, settings: dict) -> Path:
    """Write the model's trained values, optimizer state, RNG states and loop state for ``state["step"]``.
    Every rank calls it; rank 0 writes. The other ranks return at once unless the updater gathers its values
    and state from all ranks (``gathers_across_ranks``: training/sharded.py), which they must join."""
    from dualsft.distributed import is_main

    step_dir = folder / f"step-{state['step']:06d}"
    if not is_main() and not getattr(updater, "gathers_across_ranks", False):
        return step_dir
    tensors = {f"param::{k}": v for k, v in updater.trainable_values().items()}
    tensors.update({f"opt::{k}": v for k, v in updater.state_tensors().items()})
    if not is_main():
        return step_dir
    tensors["rng::cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng::cuda"] = torch.cuda.get_rng_state()
    save_tensors(step_dir / "state.safetensors", tensors)
    write_json(step_dir / "state.json", {**state, "settings": settings})
    write_json(folder / LATEST, {"step": state["step"], "dir": step_dir.name})
    for old in folder.glob("step-*"):
        if old.is_dir() and old.name != step_dir.name:
            shutil.rmtree(old, ignore_errors=True)
    return step_dir


def load_checkpoint(folder: Path, updater: Any, settings: dict) -> dict | None:
    """Restore the latest checkpoint into ``updater`` (and the RNG); returns the loop state, or None if
    there is none. Refuses (MetadataMismatchError) a checkpoint made with different settings."""
    if not (folder / LATEST).exists():
        return None
    latest = read_json(folder / LATEST)
    step_dir = folder / latest["dir"]
    state = read_json(step_dir / "state.json")
    diff = first_difference(state.get("settings"), settings)
    if diff:
        raise MetadataMismatchError(
            f"checkpoint {step_dir} was made with different training settings (field {diff!r}); rerun with the "
            "same options, or pass --overwrite to start over", f"settings.{diff}")
    tensors = load_tensors(step_dir / "state.safetensors")
    updater.load_trainable_values({k[len("param::"):]: v for k, v in tensors.items() if k.startswith("param::")})
    updater.load_state_tensors({k[len("opt::"):]: v for k, v in tensors.items() if k.startswith("opt::")})
    torch.set_rng_state(tensors["rng::cpu"])
    if "rng::cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng::cuda"])
    state.pop("settings", None)
    return state


def clear_checkpoints(folder: Path) -> None:
    """Remove the checkpoint folder (after a successful run, unless kept)."""
    shutil.rmtree(folder, ignore_errors=True)
