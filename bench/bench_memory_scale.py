"""Peak memory per rank of warm-up, score and sparse training, measured beside `dualsft estimate` (issue 14).

    python bench/bench_memory_scale.py                       # table on stdout + bench/results/memory_scale.json
    python bench/bench_memory_scale.py --seq-len 128 --batch 4 --pool 16

SmolLM2-135M-Instruct in float32 on CPU (the embedded model), synthetic records of about ``--seq-len``
tokens (random text: no download), micro-batch ``--batch``. Each case runs the stage's own ``main`` (as the
CLI does) in fresh processes: world size 1 (plain python), and 2 under torchrun (gloo), data parallel
(``--sharding none``) and FSDP2 (``--sharding fsdp``, warm-up and training only: scoring is not sharded).
Each rank reports VmHWM (peak RSS) minus its VmRSS just before the stage starts (after importing torch
and dualsft), so model loading, statistics, optimizer state and activations count, the interpreter does
not. The estimate is `dualsft.estimate.stage_memory` for the same model, B, T, float32 weights and world
size (its per-rank total for the matching stage). Ratios measured/estimated are printed; the estimate's
activations are a rough formula and CPU allocators keep freed blocks, so read the ratio, not the bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (stage, world size, sharding) -> the estimate's row
CASES = [("warmup", 1, "none"), ("warmup", 2, "none"), ("warmup", 2, "fsdp"),
         ("score", 1, "none"), ("score", 2, "none"),
         ("train", 1, "none"), ("train", 2, "none"), ("train", 2, "fsdp")]
ESTIMATE_ROW = {("warmup", "none"): "warmup (full AdamW, DDP as implemented)",
                ("warmup", "fsdp"): "warmup (FSDP2, --sharding fsdp)",
                ("score", "none"): "score (ghost/jvp rows, anchor pass)",
                ("train", "none"): "train sparse (SparseAdamW, k entries)",
                ("train", "fsdp"): "train sparse (FSDP2, --sharding fsdp)"}


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def prepare(work: Path, pool: int, seq_len: int) -> None:
    """Synthetic pool/target records and a seeded 10% random mask over every SmolLM2 tensor."""
    import torch

    from dualsft.io import write_jsonl
    from dualsft.models import load_model
    from dualsft.selection.mask import save_mask

    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "seven", "nine", "sum", "of", "the", "and"]

    def text(n: int) -> str:
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))

    rec = [{"instruction": text(seq_len // 3), "response": text(seq_len // 3)} for _ in range(pool)]
    write_jsonl(work / "pool.jsonl", rec)
    write_jsonl(work / "target.jsonl", rec[: max(2, pool // 4)])
    model = load_model(None, "float32", "cpu")
    mask = {n: torch.randperm(p.numel(), generator=g)[: p.numel() // 10].sort().values.to(torch.int32)
            for n, p in model.named_parameters()}
    save_mask(work / "mask.safetensors", mask, {n: tuple(p.shape) for n, p in model.named_parameters()})


def stage_config(stage: str, work: Path, run: Path, args: argparse.Namespace, sharding: str):
    """The stage's config: B = --batch per forward/backward, T = --seq-len, float32, CPU."""
    from dualsft.scoring import score, warmup
    from dualsft.training import train

    common = dict(dtype="float32", device="cpu", run_dir=str(run), max_length=args.seq_len)
    if stage == "warmup":
        return warmup.main, warmup.WarmupConfig(**common, pool=str(work / "pool.jsonl"), warmup_ratio=1.0,
                                                batch_size=args.batch, micro_batch_size=args.batch,
                                                sharding=sharding, overwrite=True)
    if stage == "score":
        return score.main, score.ScoreConfig(**common, pool=str(work / "pool.jsonl"), target=str(work / "target.jsonl"),
                                             batch_size=args.batch, order=2, overwrite=True)
    return train.main, train.TrainConfig(**common, train_file=str(work / "pool.jsonl"), data="all",
                                         mask=str(work / "mask.safetensors"), method="sparse", epochs=1,
                                         batch_size=args.batch * 2, micro_batch_size=args.batch, lr=1e-5,
                                         checkpoint_every=0, progress=False, sharding=sharding, overwrite=True,
                                         out=str(run / "train"))


def worker(args: argparse.Namespace) -> None:
    """One rank of one case: run the stage, write {rank, before, peak} next to the run folder."""
    import torch

    torch.set_num_threads(1)
    from dualsft import distributed as dist

    work, run = Path(args.work), Path(args.case_dir)
    main, cfg = stage_config(args.worker, work, run, args, args.sharding)
    before = status_kb("VmRSS")
    main(cfg)
    peak = status_kb("VmHWM")
    rank = dist.rank()
    (run / f"mem.rank{rank}.json").write_text(json.dumps({"rank": rank, "before_kb": before, "peak_kb": peak}))
    dist.shutdown()


def run_case(stage: str, world: int, sharding: str, work: Path, args: argparse.Namespace) -> list[dict]:
    run = work / f"{stage}-w{world}-{sharding}"
    run.mkdir(parents=True, exist_ok=True)
    if stage == "score":  # score at θw with c: the 1-rank warm-up's folder (so the anchor pass loads θ0 too)
        shutil.copytree(work / "warmup-w1-none" / "warmup", run / "warmup", dirs_exist_ok=True)
    me = [__file__, "--worker", stage, "--work", str(work), "--case-dir", str(run), "--sharding", sharding,
          "--seq-len", str(args.seq_len), "--batch", str(args.batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}
    if world == 1:
        cmd = [sys.executable, *me]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
        cmd = [*launcher, "--standalone", f"--nproc_per_node={world}", *me]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{stage} world {world} {sharding} failed:\n{proc.stderr[-4000:]}")
    return [json.loads((run / f"mem.rank{r}.json").read_text()) for r in range(world)]


def estimates(args: argparse.Namespace) -> dict[tuple[str, int, str], float]:
    """The estimate's per-rank total (MiB) for every case."""
    from dualsft.estimate import EstimateConfig, load_config, model_dims, stage_memory

    m = model_dims(load_config("smollm2-135m"), "smollm2-135m")
    out = {}
    for stage, world, sharding in CASES:
        cfg = EstimateConfig(model="smollm2-135m", world_size=world, batch_size=args.batch, seq_len=args.seq_len,
                             weights_dtype="float32", k_fraction=0.1)
        out[stage, world, sharding] = sum(stage_memory(m, cfg)[ESTIMATE_ROW[stage, sharding]].values()) / 2**20
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=128, help="T: tokens per example (about)")
    ap.add_argument("--batch", type=int, default=4, help="B: examples per forward/backward")
    ap.add_argument("--pool", type=int, default=16, help="pool examples (warm-up, score and training use them all)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_scale.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    ap.add_argument("--case-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--sharding", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    t0 = time.time()
    est = estimates(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="memscale") as tmp:
        work = Path(tmp)
        prepare(work, args.pool, args.seq_len)
        for stage, world, sharding in CASES:
            ranks = run_case(stage, world, sharding, work, args)
            measured = max((r["peak_kb"] - r["before_kb"]) / 1024 for r in ranks)
            e = est[stage, world, sharding]
            rows.append({"stage": stage, "world_size": world, "sharding": sharding, "measured_peak_mib": round(measured, 1),
                         "per_rank_mib": [round((r["peak_kb"] - r["before_kb"]) / 1024, 1) for r in ranks],
                         "estimate_mib": round(e, 1), "measured_over_estimate": round(measured / e, 3)})
            print(f"[{time.time() - t0:5.0f}s] {stage} N={world} {sharding}: peak {measured:.0f} MiB per rank, "
                  f"estimate {e:.0f} MiB", flush=True)
    base = {r["stage"]: r["measured_peak_mib"] for r in rows if r["world_size"] == 1}
    for r in rows:
        r["vs_world1"] = round(r["measured_peak_mib"] / base[r["stage"]], 3)
    print("| stage | N | sharding | measured peak per rank (MiB) | estimate (MiB) | measured / estimate | vs N=1 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['world_size']} | {r['sharding']} | {r['measured_peak_mib']:.0f} | "
              f"{r['estimate_mib']:.0f} | {r['measured_over_estimate']:.2f} | {r['vs_world1']:.2f} |")
    out = {"setup": {"model": "SmolLM2-135M-Instruct (float32, CPU)", "seq_len": args.seq_len, "batch": args.batch,
                     "pool": args.pool, "threads_per_rank": 1, "cpu_count": os.cpu_count(),
                     "load_avg": os.getloadavg()}, "rows": rows, "wall_s": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
