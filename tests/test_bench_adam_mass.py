"""bench/adam_mass.py: uᵀG and its part on coordinates with tiny c, checked against a hand computation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import save_file

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "adam_mass.py"


def test_adam_mass_splits_phi_by_curvature(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("adam_mass", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    u = {"emb": torch.tensor([1.0, 2.0, 3.0]), "w": torch.tensor([[0.5, -1.0]])}
    G = {"emb": torch.tensor([1.0, -1.0, 2.0]), "w": torch.tensor([[2.0, 1.0]])}
    c = {"emb": torch.tensor([1e-20, 1.0, 1e-20]), "w": torch.tensor([[1.0, 1.0]])}
    save_file(u, str(tmp_path / "u.safetensors"))
    save_file(G, str(tmp_path / "grad_sum.safetensors"))
    save_file(c, str(tmp_path / "c.safetensors"))
    r = mod.adam_mass(tmp_path, tmp_path / "c.safetensors", small=1e-6)
    # φ = u⊙G: emb (1, -2, 6), w (1, -1): uᵀG = 5; √c < 1e-6 on emb[0], emb[2]: 1 + 6 = 7
    assert abs(r["uTG"] - 5.0) < 1e-12 and abs(r["uTG_from_small_c"] - 7.0) < 1e-12
    assert abs(r["share_small_c_coordinates"] - 2 / 5) < 1e-12
    top = r["top_tensors"][0]
    assert top["tensor"] == "emb" and abs(top["share_of_abs_phi"] - 9 / 11) < 1e-12
