"""Where φ_param's mass sits under `--precondition adam`: per tensor, and on coordinates the warm-up barely moved.

    python bench/adam_mass.py --case NAME SCORES_DIR CURVATURE [--case ...] [--small 1e-6]
        [--json bench/results/adam_mass.json]

SCORES_DIR holds u.safetensors and grad_sum.safetensors (`dualsft score`), CURVATURE the warm-up's
exp_avg_sq.safetensors. With P = 1/(√c + ε), a coordinate whose √c is far below the others gets an enormous
P, so u = P ⊙ (ηv − ...) and φ_param = u ⊙ G can be dominated by coordinates the warm-up never moved (for a
tied embedding: the rows of tokens absent from the warm-up subset, whose output-head gradient is tiny but not
zero). Prints, per case: uᵀG, the part of it from coordinates with √c < --small, their share of all
coordinates, and the tensors holding most of Σ|φ_param|. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file


def adam_mass(scores: Path, curvature: Path, small: float, top: int = 5) -> dict:
    """uᵀG, its part on √c < small, the share of such coordinates, and the top tensors by Σ|φ_param|."""
    u, G, c = (load_file(str(p)) for p in (scores / "u.safetensors", scores / "grad_sum.safetensors", curvature))
    per, total, total_small, n_small, n_all = [], 0.0, 0.0, 0, 0
    for name, un in u.items():
        phi = (un.double() * G[name].double()).flatten()
        tiny = c[name].double().flatten().clamp_min(0).sqrt() < small
        total += phi.sum().item()
        total_small += phi[tiny].sum().item()
        n_small += int(tiny.sum())
        n_all += tiny.numel()
        per.append({"tensor": name, "abs_phi": phi.abs().sum().item(), "phi_sum": phi.sum().item(),
                    "share_small_c": tiny.float().mean().item()})
    abs_total = sum(p["abs_phi"] for p in per)
    per.sort(key=lambda p: -p["abs_phi"])
    for p in per:
        p["share_of_abs_phi"] = p["abs_phi"] / abs_total if abs_total else 0.0
    return {"uTG": total, "uTG_from_small_c": total_small, "share_small_c_coordinates": n_small / max(n_all, 1),
            "small": small, "top_tensors": per[:top]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", nargs=3, action="append", metavar=("NAME", "SCORES_DIR", "CURVATURE"), required=True)
    p.add_argument("--small", type=float, default=1e-6, help="√c below this counts as 'never moved'")
    p.add_argument("--json", default="bench/results/adam_mass.json")
    args = p.parse_args(argv)
    out = []
    print("| case | uᵀG | from √c < small | coordinates with √c < small | top tensor (share of Σ|φ_param|) |")
    print("|---|---|---|---|---|")
    for name, scores, curv in args.case:
        r = {"case": name, "scores": scores, "curvature": curv, **adam_mass(Path(scores), Path(curv), args.small)}
        out.append(r)
        t = r["top_tensors"][0]
        print(f"| {name} | {r['uTG']:.4g} | {r['uTG_from_small_c']:.4g} | {r['share_small_c_coordinates']:.1%} | "
              f"{t['tensor']} ({t['share_of_abs_phi']:.0%}) |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"small": args.small, "cases": out}, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
