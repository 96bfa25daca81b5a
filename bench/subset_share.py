"""How much of DualSFT's data subset comes from the target task (issue 13's first acceptance criterion).

    python bench/subset_share.py --case NAME POOL.jsonl TASK SCORES_DIR [--case ...] [--budget 0.1]
        [--json bench/results/subset_share.json]

For each case: the top-b pool examples by the "score" of SCORES_DIR/data_scores.jsonl (what `dualsft select`
ranks; b = budget × N, as select's default 10%), their tasks and the target task's answer types, and the
share of target-task examples in the subset against the pool's share (the criterion: at least twice it).
Prints a markdown table and writes JSON (paths relative to where it ran).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import torch

from dualsft.selection.policy import select_subset


def subset_share(pool: list[dict], scores: list[dict], task: str, budget: float) -> dict:
    """The subset `dualsft select` takes (select_subset: top-b of the score, ties to the earlier pool position)
    -> counts by task, the target's answer types, shares."""
    sel = select_subset(torch.tensor([r["score"] for r in scores], dtype=torch.float64), budget)
    b = sel.b
    by_index = {r["index"]: r for r in pool}
    picked = [by_index[scores[int(i)]["index"]] for i in sel.positions]
    tasks = Counter(r["task"] for r in picked)
    pool_share = sum(r["task"] == task for r in pool) / len(pool)
    return {"b": b, "n_pool": len(pool), "target_in_subset": tasks[task], "subset_share": tasks[task] / b,
            "pool_share": pool_share, "ratio": (tasks[task] / b) / pool_share, "passes_2x": tasks[task] / b >= 2 * pool_share,
            "tasks": dict(tasks.most_common()),
            "target_answer_types": dict(Counter(r.get("answer_type", "?") for r in picked if r["task"] == task))}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs=4, action="append", metavar=("NAME", "POOL", "TASK", "SCORES_DIR"), required=True)
    ap.add_argument("--budget", type=float, default=0.1, help="fraction of the pool (or a count > 1), as select")
    ap.add_argument("--json", default="bench/results/subset_share.json")
    args = ap.parse_args()
    rows = []
    for name, pool, task, sdir in args.case:
        res = subset_share(read_jsonl(Path(pool)), read_jsonl(Path(sdir) / "data_scores.jsonl"), task, args.budget)
        rows.append({"case": name, "task": task, "scores": os.path.relpath(sdir), **res})
    print("| case | target task | target in subset | subset share | pool share | ≥ 2× pool | subset by task "
          "| target answer types |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['task']} | {r['target_in_subset']}/{r['b']} | {r['subset_share']:.0%} | "
              f"{r['pool_share']:.0%} | {'yes' if r['passes_2x'] else 'no'} | "
              f"{', '.join(f'{k} {v}' for k, v in r['tasks'].items())} | "
              f"{', '.join(f'{k} {v}' for k, v in r['target_answer_types'].items())} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"budget": args.budget, "cases": rows}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
