"""Peak memory per rank of warm-up, score and sparse training, measured beside `dualsft estimate` (issue 14).

    python bench/bench_memory_scale.py                       # table on stdout + bench/results/memory_scale.json
    python bench/bench_memory_scale.py --seq-len 128 --batch 4 --pool 16
    python bench/bench_memory_scale.py --model llama-0.5b --stages warmup,train --seq-len 64 --batch 2 --no-ddp2 \
        --out bench/results/memory_scale_llama05b.json   # weights dominate: what sharding saves shows

SmolLM2-135M-Instruct (``--model smollm2``, the embedded model) or a random-initialised Llama of 0.48B
parameters (``--model llama-0.5b``: RANDOM_LLAMA with SmolLM2's tokenizer and vocabulary, built and saved
first) in float32 on CPU, synthetic records of about ``--seq-len`` tokens (random text: no download), micro-
batch ``--batch``. Each case runs the stage's own ``main`` (as the CLI does) in fresh processes: world size 1
(plain python), and 2 under torchrun (gloo), data parallel (``--sharding none``) and FSDP2 (``--sharding
fsdp``: weights, teacher and every statistic sharded). Each rank reports VmHWM (peak RSS) minus its VmRSS
just before the stage starts (after importing torch and dualsft), so model loading, statistics, optimizer
state and activations count, the interpreter does not. The estimate is `dualsft.estimate.stage_memory` for the
same model, B, T (the data's real padded length, below ``--seq-len``), float32 weights and world size (its
per-rank total for the matching stage). Ratios measured/estimated are printed; the estimate's activations are
a rough formula, so read the ratio, not the bytes. The workers run with MALLOC_MMAP_THRESHOLD_=131072 (see
run_case): glibc otherwise keeps freed large blocks, and FSDP's per-layer gather/free cycles then inflate RSS
far beyond what is allocated.
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

from bench_memory import _reset_peak as reset_peak  # the same /proc readings as bench_memory.py
from bench_memory import _status_kb as status_kb

# (stage, world size, sharding) -> the estimate's row
CASES = [("warmup", 1, "none"), ("warmup", 2, "none"), ("warmup", 2, "fsdp"),
         ("score", 1, "none"), ("score", 2, "none"), ("score", 2, "fsdp"),
         ("train", 1, "none"), ("train", 2, "none"), ("train", 2, "fsdp")]
# a Llama-style config of 0.48B parameters (random weights: memory, not quality, is measured)
RANDOM_LLAMA = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 1536, "intermediate_size": 4096,
                "num_hidden_layers": 16, "num_attention_heads": 12, "num_key_value_heads": 4,
                "tie_word_embeddings": True}
ESTIMATE_ROW = {("warmup", "none"): "warmup (full AdamW, DDP as implemented)",
                ("warmup", "fsdp"): "warmup (FSDP2, --sharding fsdp)",
                ("score", "none"): "score (ghost/jvp rows, anchor pass)",
                ("score", "fsdp"): "score (FSDP2, --sharding fsdp)",
                ("train", "none"): "train sparse (SparseAdamW, k entries)",
                ("train", "fsdp"): "train sparse (FSDP2, --sharding fsdp)"}


def model_path(work: Path, name: str) -> str:
    """The model the cases load: the embedded SmolLM2, or the random Llama's folder under ``work``."""
    from dualsft.models import resolve_model_path

    return resolve_model_path(None) if name == "smollm2" else str(work / "model")


def prepare(work: Path, pool: int, seq_len: int, name: str) -> None:
    """Synthetic pool/target records, the random Llama's folder (``name`` llama-0.5b) and a seeded 10% random
    mask over every tensor of the model."""
    import torch

    from dualsft.io import write_jsonl
    from dualsft.models import load_model, load_tokenizer
    from dualsft.selection.mask import save_mask

    if name != "smollm2":
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(RANDOM_LLAMA)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(
            str(work / "model"))
        load_tokenizer(None).save_pretrained(str(work / "model"))  # SmolLM2's tokenizer (same vocabulary)

    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "seven", "nine", "sum", "of", "the", "and"]

    def text(n: int) -> str:
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))

    n = max(2, seq_len // 6)  # words each side: the chat template (a system prompt) takes ~30 tokens too
    rec = [{"instruction": text(n), "response": text(n)} for _ in range(pool)]
    write_jsonl(work / "pool.jsonl", rec)
    from dualsft.data.formats import load_examples, tokenize_examples

    toks = tokenize_examples(load_examples(work / "pool.jsonl"), load_tokenizer(model_path(work, name)), "chat", seq_len)
    (work / "tokens.json").write_text(json.dumps({"padded_length": max(len(t.input_ids) for t in toks)}))
    write_jsonl(work / "target.jsonl", rec[: max(2, pool // 4)])
    model = load_model(model_path(work, name), "float32", "cpu")
    mask = {n: torch.randperm(p.numel(), generator=g)[: p.numel() // 10].sort().values.to(torch.int32)
            for n, p in model.named_parameters()}
    save_mask(work / "mask.safetensors", mask, {n: tuple(p.shape) for n, p in model.named_parameters()})


def stage_config(stage: str, work: Path, run: Path, args: argparse.Namespace, sharding: str):
    """The stage's config: B = --batch per forward/backward, T = --seq-len, float32, CPU."""
    from dualsft.scoring import score, warmup
    from dualsft.training import train

    common = dict(model=model_path(work, args.model), dtype="float32", device="cpu", run_dir=str(run),
                  max_length=args.seq_len)
    if stage == "warmup":
        return warmup.main, warmup.WarmupConfig(**common, pool=str(work / "pool.jsonl"), warmup_ratio=1.0,
                                                batch_size=args.batch, micro_batch_size=args.batch,
                                                sharding=sharding, overwrite=True)
    if stage == "score":
        return score.main, score.ScoreConfig(**common, pool=str(work / "pool.jsonl"), target=str(work / "target.jsonl"),
                                             batch_size=args.batch, order=2, sharding=sharding, overwrite=True)
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
    loop = watch_training_loop()
    before = status_kb("VmRSS")
    main(cfg)
    peak = status_kb("VmHWM")
    rank = dist.rank()
    (run / f"mem.rank{rank}.json").write_text(json.dumps({"rank": rank, "before_kb": before, "peak_kb": peak,
                                                          **loop}))
    dist.shutdown()


def watch_training_loop() -> dict:
    """Wrap the training loop the warm-up and train stages call: at its entry (model loaded, not yet sharded)
    reset the peak (/proc/self/clear_refs) and record RSS; at its exit record the peak. So "loop" figures
    leave out loading and the writing after it (gathering onto rank 0, serialisation, fingerprints)."""
    from dualsft.scoring import warmup
    from dualsft.training import loop, train

    out: dict = {}
    inner = loop.train_restricted

    def watched(*a, **kw):
        out["loop_entry_kb"] = status_kb("VmRSS")
        if not reset_peak():
            out["peak_reset"] = False
        result = inner(*a, **kw)
        out["loop_peak_kb"] = status_kb("VmHWM")
        return result

    warmup.train_restricted = train.train_restricted = watched
    return out


def run_case(stage: str, world: int, sharding: str, work: Path, args: argparse.Namespace) -> list[dict]:
    run = work / f"{stage}-w{world}-{sharding}"
    run.mkdir(parents=True, exist_ok=True)
    if stage == "score":  # score at θw with c: the 1-rank warm-up's folder (so the anchor pass loads θ0 too)
        shutil.copytree(work / "warmup-w1-none" / "warmup", run / "warmup", dirs_exist_ok=True)
    me = [__file__, "--worker", stage, "--work", str(work), "--case-dir", str(run), "--sharding", sharding,
          "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--model", args.model]
    # glibc's dynamic mmap threshold keeps freed large blocks in the heap (RSS never falls), which turns
    # FSDP's per-layer gather/free cycles into a growing RSS; a fixed threshold returns them (GPU allocators
    # reuse such blocks themselves). Measured on train N=2 fsdp, T=64: 2407 MiB without, 1285 MiB with.
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
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


def cases(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    """CASES of the stages asked for (``--stages``), without the data-parallel N=2 ones under ``--no-ddp2``."""
    return [c for c in CASES if c[0] in args.stages.split(",") and not (args.no_ddp2 and c[1:] == (2, "none"))]


def estimates(args: argparse.Namespace, seq: int) -> dict[tuple[str, int, str], float]:
    """The estimate's per-rank total (MiB) for every case, at the data's real padded length ``seq``."""
    from dualsft.estimate import EstimateConfig, load_config, model_dims, stage_memory

    name = "smollm2-135m" if args.model == "smollm2" else args.model
    if args.model == "smollm2":
        config = load_config(name)
    else:
        from transformers import AutoConfig

        cfg = dict(RANDOM_LLAMA)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    m = model_dims(config, name)
    out = {}
    for stage, world, sharding in cases(args):
        cfg = EstimateConfig(model=name, world_size=world, batch_size=args.batch, seq_len=seq,
                             weights_dtype="float32", k_fraction=0.1)
        out[stage, world, sharding] = sum(stage_memory(m, cfg)[ESTIMATE_ROW[stage, sharding]].values()) / 2**20
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=128, help="T: tokens per example (about)")
    ap.add_argument("--batch", type=int, default=4, help="B: examples per forward/backward")
    ap.add_argument("--pool", type=int, default=16, help="pool examples (warm-up, score and training use them all)")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama-0.5b"], help="what to load (see above)")
    ap.add_argument("--stages", default="warmup,score,train", help="comma list of warmup, score, train")
    ap.add_argument("--no-ddp2", action="store_true", help="skip the data-parallel N=2 cases (two whole replicas: "
                                                             "the most memory of all)")
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
    rows = []
    with tempfile.TemporaryDirectory(prefix="memscale") as tmp:
        work = Path(tmp)
        prepare(work, args.pool, args.seq_len, args.model)
        seq = json.loads((work / "tokens.json").read_text())["padded_length"]  # T the batches really have
        est = estimates(args, seq)
        for stage, world, sharding in cases(args):
            ranks = run_case(stage, world, sharding, work, args)
            measured = max((r["peak_kb"] - r["before_kb"]) / 1024 for r in ranks)
            e = est[stage, world, sharding]
            row = {"stage": stage, "world_size": world, "sharding": sharding, "measured_peak_mib": round(measured, 1),
                   "per_rank_mib": [round((r["peak_kb"] - r["before_kb"]) / 1024, 1) for r in ranks],
                   "estimate_mib": round(e, 1), "measured_over_estimate": round(measured / e, 3)}
            if stage == "score":  # the statistics each rank held, counted from its tensors (summary.json)
                held = json.loads((work / f"{stage}-w{world}-{sharding}" / "scores" / "summary.json").read_text())
                row["statistics_mib_per_rank"] = [round(b / 2**20, 1) for b in held["statistics_bytes_per_rank"]]
            if "loop_peak_kb" in ranks[0]:  # the training loop alone (warm-up, train): see watch_training_loop
                loop = max((r["loop_peak_kb"] - r["before_kb"]) / 1024 for r in ranks)
                row.update({"loop_peak_mib": round(loop, 1), "loop_over_estimate": round(loop / e, 3),
                            "loop_per_rank_mib": [round((r["loop_peak_kb"] - r["before_kb"]) / 1024, 1) for r in ranks]})
            rows.append(row)
            print(f"[{time.time() - t0:5.0f}s] {stage} N={world} {sharding}: peak {measured:.0f} MiB per rank, "
                  f"estimate {e:.0f} MiB", flush=True)
    base = {r["stage"]: r["measured_peak_mib"] for r in rows if r["world_size"] == 1}
    for r in rows:
        r["vs_world1"] = round(r["measured_peak_mib"] / base[r["stage"]], 3)
    stats1 = [max(r["statistics_mib_per_rank"]) for r in rows if "statistics_mib_per_rank" in r and r["world_size"] == 1]
    for r in rows:
        if "statistics_mib_per_rank" in r and stats1:
            r["statistics_vs_world1"] = round(max(r["statistics_mib_per_rank"]) / stats1[0], 3)
            print(f"score N={r['world_size']} {r['sharding']}: statistics held per rank {r['statistics_mib_per_rank']} "
                  f"MiB ({r['statistics_vs_world1']:.2f}x N=1)")
    loops = {r["stage"]: r.get("loop_peak_mib") for r in rows if r["world_size"] == 1}
    for r in rows:
        if r.get("loop_peak_mib") and loops.get(r["stage"]):
            r["loop_vs_world1"] = round(r["loop_peak_mib"] / loops[r["stage"]], 3)
    print("| stage | N | sharding | stage peak per rank (MiB) | training loop peak (MiB) | estimate (MiB) | "
          "stage / estimate | loop / estimate | stage vs N=1 | loop vs N=1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lp = r.get("loop_peak_mib")
        print(f"| {r['stage']} | {r['world_size']} | {r['sharding']} | {r['measured_peak_mib']:.0f} | "
              f"{f'{lp:.0f}' if lp else '–'} | {r['estimate_mib']:.0f} | {r['measured_over_estimate']:.2f} | "
              f"{r.get('loop_over_estimate', '–')} | {r['vs_world1']:.2f} | {r.get('loop_vs_world1', '–')} |")
    out = {"setup": {"model": args.model + " (float32, CPU)", "seq_len": args.seq_len, "padded_length": seq, "batch": args.batch,
                     "pool": args.pool, "threads_per_rank": 1, "cpu_count": os.cpu_count(),
                     "load_avg": os.getloadavg()}, "rows": rows, "wall_s": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
