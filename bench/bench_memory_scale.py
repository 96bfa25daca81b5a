"""Peak memory per rank of warm-up, score and sparse training, measured beside `dualsft estimate` (issue 14).

    python bench/bench_memory_scale.py                       # table on stdout + bench/results/memory_scale.json
    python bench/bench_memory_scale.py --seq-len 128 --batch 4 --pool 16
    python bench/bench_memory_scale.py --model llama-0.5b --stages warmup,train --seq-len 64 --batch 2 --no-ddp2 \
        --out bench/results/memory_scale_llama05b.json   # weights dominate: what sharding saves shows
    python bench/bench_memory_scale.py --stages score --no-ddp2 --seq-len 512 --full-length --batch 2 --pool 4 \
        --gradient-checkpointing both --out bench/results/memory_score_ckpt_t512.json  # score with and without

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
``--gradient-checkpointing off|on|both`` runs every case without, with, or both ways (the stages' own flag;
for `dualsft score` every pass: target, anchor, pool_G, pool_rows; scored with the paper's formula,
dualsft.config.PAPER_SCORE, as the recorded results were), and ``both`` prints the two side by side.
The score stage also reports each pass's own peak (the peak is reset as each pass starts). ``--full-length``
makes every record longer than ``--seq-len`` so that each is truncated to exactly T tokens (the default
records fill about 0.6 T). A score-only run first makes the warm-up it scores at (not measured).
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


def prepare(work: Path, pool: int, seq_len: int, name: str, full_length: bool = False) -> None:
    """Synthetic pool/target records, the random Llama's folder (``name`` llama-0.5b) and a seeded 10% random
    mask over every tensor of the model. ``full_length``: records longer than ``seq_len`` (truncated to it)."""
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

    # words (about a token each) per side: the chat template (a system prompt) takes ~30 tokens too; with
    # full_length the response alone is T words, so truncation leaves exactly T tokens with T/4 prompt words
    n = max(2, seq_len // 6)
    rec = [{"instruction": text(seq_len // 4 if full_length else n), "response": text(seq_len if full_length else n)}
           for _ in range(pool)]
    write_jsonl(work / "pool.jsonl", rec)
    from dualsft.data.formats import load_examples, tokenize_examples

    toks = tokenize_examples(load_examples(work / "pool.jsonl"), load_tokenizer(model_path(work, name)), "chat", seq_len)
    (work / "tokens.json").write_text(json.dumps({"padded_length": max(len(t.input_ids) for t in toks)}))
    write_jsonl(work / "target.jsonl", rec[: max(2, pool // 4)])
    model = load_model(model_path(work, name), "float32", "cpu")
    mask = {n: torch.randperm(p.numel(), generator=g)[: p.numel() // 10].sort().values.to(torch.int32)
            for n, p in model.named_parameters()}
    save_mask(work / "mask.safetensors", mask, {n: tuple(p.shape) for n, p in model.named_parameters()})


def stage_config(stage: str, work: Path, run: Path, args: argparse.Namespace, sharding: str, ckpt: bool = False):
    """The stage's config: B = --batch per forward/backward, T = --seq-len, float32, CPU; ``ckpt``: the stage's
    --gradient-checkpointing."""
    from dualsft.config import PAPER_SCORE
    from dualsft.scoring import score, warmup
    from dualsft.training import train

    common = dict(model=model_path(work, args.model), dtype="float32", device="cpu", run_dir=str(run),
                  max_length=args.seq_len)
    if stage == "warmup":
        return warmup.main, warmup.WarmupConfig(**common, pool=str(work / "pool.jsonl"), warmup_ratio=1.0,
                                                batch_size=args.batch, micro_batch_size=args.batch,
                                                sharding=sharding, overwrite=True, gradient_checkpointing=ckpt)
    if stage == "score":
        # the paper's formula, as bench/results/memory_*.json were measured (the defaults, LESS's form, add a
        # target_norms pass and per-example norms in the row pass: not measured here)
        return score.main, score.ScoreConfig(**common, pool=str(work / "pool.jsonl"), target=str(work / "target.jsonl"),
                                             batch_size=args.batch, order=2, sharding=sharding, overwrite=True,
                                             gradient_checkpointing=ckpt, **PAPER_SCORE)
    return train.main, train.TrainConfig(**common, train_file=str(work / "pool.jsonl"), data="all",
                                         mask=str(work / "mask.safetensors"), method="sparse", epochs=1,
                                         batch_size=args.batch * 2, micro_batch_size=args.batch, lr=1e-5,
                                         checkpoint_every=0, progress=False, sharding=sharding, overwrite=True,
                                         out=str(run / "train"), gradient_checkpointing=ckpt)


def worker(args: argparse.Namespace) -> None:
    """One rank of one case: run the stage, write {rank, before, peak} next to the run folder."""
    import torch

    torch.set_num_threads(1)
    from dualsft import distributed as dist

    work, run = Path(args.work), Path(args.case_dir)
    main, cfg = stage_config(args.worker, work, run, args, args.sharding, args.ckpt)
    loop = watch_training_loop()
    passes = watch_score_passes()
    before = status_kb("VmRSS")
    main(cfg)
    # the per-pass resets lower VmHWM: the stage's peak is the largest of the pieces
    peak = max([status_kb("VmHWM"), *passes["before_pass_kb"], *passes["pass_peak_kb"].values()])
    rank = dist.rank()
    (run / f"mem.rank{rank}.json").write_text(json.dumps({"rank": rank, "before_kb": before, "peak_kb": peak,
                                                          **loop, **passes}))
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


def watch_score_passes() -> dict:
    """Wrap the pass loop `dualsft score` calls: at each pass's entry record the peak so far and reset it; at
    its exit record the pass's peak ("pass_peak_kb" by pass name: target, anchor, pool_G, pool_rows, ...)."""
    from dualsft.scoring import score

    out: dict = {"before_pass_kb": [], "pass_peak_kb": {}}
    inner = score.sharded_pass

    def watched(name, *a, **kw):
        out["before_pass_kb"].append(status_kb("VmHWM"))
        reset_peak()
        result = inner(name, *a, **kw)
        out["pass_peak_kb"][name] = status_kb("VmHWM")
        return result

    score.sharded_pass = watched
    return out


def run_case(stage: str, world: int, sharding: str, work: Path, args: argparse.Namespace,
             ckpt: bool = False) -> list[dict]:
    run = work / f"{stage}-w{world}-{sharding}" if not ckpt else work / f"{stage}-w{world}-{sharding}-ckpt"
    run.mkdir(parents=True, exist_ok=True)
    if stage == "score":  # score at θw with c: a 1-rank warm-up's folder (so the anchor pass loads θ0 too)
        warm = [d for d in (work / "warmup-w1-none", work / "warmup-w1-none-ckpt") if d.exists()]
        if not warm:  # a score-only run: make the warm-up (not measured)
            run_case("warmup", 1, "none", work, args)
            warm = [work / "warmup-w1-none"]
        shutil.copytree(warm[0] / "warmup", run / "warmup", dirs_exist_ok=True)
    me = [__file__, "--worker", stage, "--work", str(work), "--case-dir", str(run), "--sharding", sharding,
          "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--model", args.model] + ["--ckpt"] * ckpt
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


def cases(args: argparse.Namespace) -> list[tuple[str, int, str, bool]]:
    """CASES of the stages asked for (``--stages``), without the data-parallel N=2 ones under ``--no-ddp2``,
    each without and/or with gradient checkpointing (``--gradient-checkpointing off|on|both``)."""
    ckpts = {"off": (False,), "on": (True,), "both": (False, True)}[args.gradient_checkpointing]
    return [(*c, ck) for c in CASES for ck in ckpts
            if c[0] in args.stages.split(",") and not (args.no_ddp2 and c[1:] == (2, "none"))]


def estimates(args: argparse.Namespace, seq: int) -> dict[tuple[str, int, str, bool], float]:
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
    for stage, world, sharding, ckpt in cases(args):
        cfg = EstimateConfig(model=name, world_size=world, batch_size=args.batch, seq_len=seq,
                             weights_dtype="float32", k_fraction=0.1, gradient_checkpointing=ckpt)
        out[stage, world, sharding, ckpt] = sum(stage_memory(m, cfg)[ESTIMATE_ROW[stage, sharding]].values()) / 2**20
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=128, help="T: tokens per example (about; exactly with --full-length)")
    ap.add_argument("--full-length", action="store_true", help="records longer than --seq-len, truncated to it")
    ap.add_argument("--batch", type=int, default=4, help="B: examples per forward/backward")
    ap.add_argument("--pool", type=int, default=16, help="pool examples (warm-up, score and training use them all)")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama-0.5b"], help="what to load (see above)")
    ap.add_argument("--stages", default="warmup,score,train", help="comma list of warmup, score, train")
    ap.add_argument("--no-ddp2", action="store_true", help="skip the data-parallel N=2 cases (two whole replicas: "
                                                             "the most memory of all)")
    ap.add_argument("--gradient-checkpointing", default="off", choices=["off", "on", "both"],
                    help="run each case without, with, or both ways (side by side)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_scale.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    ap.add_argument("--case-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--sharding", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="memscale") as tmp:
        work = Path(tmp)
        prepare(work, args.pool, args.seq_len, args.model, args.full_length)
        seq = json.loads((work / "tokens.json").read_text())["padded_length"]  # T the batches really have
        est = estimates(args, seq)
        for stage, world, sharding, ckpt in cases(args):
            ranks = run_case(stage, world, sharding, work, args, ckpt)
            rows.append(case_row(stage, world, sharding, ckpt, ranks, est[stage, world, sharding, ckpt],
                                 held_statistics(work, stage, world, sharding, ckpt)))
            print(f"[{time.time() - t0:5.0f}s] {stage} N={world} {sharding}{' ckpt' if ckpt else ''}: peak "
                  f"{rows[-1]['measured_peak_mib']:.0f} MiB per rank, estimate {rows[-1]['estimate_mib']:.0f} MiB",
                  flush=True)
    add_ratios(rows)
    print(table(rows))
    if args.gradient_checkpointing == "both":
        print(checkpointing_table(rows))
    out = {"setup": {"model": args.model + " (float32, CPU)", "seq_len": args.seq_len, "padded_length": seq,
                     "full_length": args.full_length, "batch": args.batch, "pool": args.pool,
                     "gradient_checkpointing": args.gradient_checkpointing, "threads_per_rank": 1,
                     "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()},
           "rows": rows, "wall_s": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def held_statistics(work: Path, stage: str, world: int, sharding: str, ckpt: bool) -> list[int] | None:
    """Scoring: the statistics bytes each rank held (its tensors, counted by `dualsft score` into summary.json)."""
    if stage != "score":
        return None
    run = work / (f"{stage}-w{world}-{sharding}" + ("-ckpt" if ckpt else ""))
    return json.loads((run / "scores" / "summary.json").read_text())["statistics_bytes_per_rank"]


def case_row(stage: str, world: int, sharding: str, ckpt: bool, ranks: list[dict], estimate: float,
             held: list[int] | None = None) -> dict:
    """One case's figures (MiB over the RSS before the stage): the stage's peak, the training loop's, each
    scoring pass's, the estimate, and (score) the statistics each rank held."""
    def mib(kb: float, r: dict) -> float:
        return round((kb - r["before_kb"]) / 1024, 1)

    measured = max(mib(r["peak_kb"], r) for r in ranks)
    row = {"stage": stage, "world_size": world, "sharding": sharding, "gradient_checkpointing": ckpt,
           "measured_peak_mib": measured, "per_rank_mib": [mib(r["peak_kb"], r) for r in ranks],
           "estimate_mib": round(estimate, 1), "measured_over_estimate": round(measured / estimate, 3)}
    if "loop_peak_kb" in ranks[0]:  # the training loop alone (warm-up, train): see watch_training_loop
        loop = max(mib(r["loop_peak_kb"], r) for r in ranks)
        row.update({"loop_peak_mib": loop, "loop_over_estimate": round(loop / estimate, 3),
                    "loop_per_rank_mib": [mib(r["loop_peak_kb"], r) for r in ranks]})
    if held is not None:
        row["statistics_mib_per_rank"] = [round(b / 2**20, 1) for b in held]
    if ranks[0].get("pass_peak_kb"):  # scoring: each pass's own peak (see watch_score_passes), rank 0
        row["pass_peak_mib"] = {p: mib(kb, ranks[0]) for p, kb in ranks[0]["pass_peak_kb"].items()}
    return row


def add_ratios(rows: list[dict]) -> None:
    """vs_world1 (and loop_vs_world1): each row over the world-size-1 row of its stage and checkpointing."""
    base = {(r["stage"], r["gradient_checkpointing"]): r for r in rows if r["world_size"] == 1}
    for r in rows:
        one = base.get((r["stage"], r["gradient_checkpointing"]))
        if one is None:
            continue
        r["vs_world1"] = round(r["measured_peak_mib"] / one["measured_peak_mib"], 3)
        if r.get("statistics_mib_per_rank") and one.get("statistics_mib_per_rank"):
            r["statistics_vs_world1"] = round(max(r["statistics_mib_per_rank"]) / one["statistics_mib_per_rank"][0], 3)
        if r.get("loop_peak_mib") and one.get("loop_peak_mib"):
            r["loop_vs_world1"] = round(r["loop_peak_mib"] / one["loop_peak_mib"], 3)


def table(rows: list[dict]) -> str:
    """Every case: peaks, the estimate and the ratios (markdown)."""
    lines = ["| stage | N | sharding | ckpt | stage peak per rank (MiB) | training loop peak (MiB) | estimate (MiB) | "
             "stage / estimate | loop / estimate | stage vs N=1 | loop vs N=1 | statistics per rank (MiB) | "
             "statistics vs N=1 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lp = r.get("loop_peak_mib")
        lines.append(f"| {r['stage']} | {r['world_size']} | {r['sharding']} | {'on' if r['gradient_checkpointing'] else 'off'} "
                     f"| {r['measured_peak_mib']:.0f} | {f'{lp:.0f}' if lp else '–'} | {r['estimate_mib']:.0f} | "
                     f"{r['measured_over_estimate']:.2f} | {r.get('loop_over_estimate', '–')} | "
                     f"{r.get('vs_world1', '–')} | {r.get('loop_vs_world1', '–')} | "
                     f"{' / '.join(str(x) for x in r.get('statistics_mib_per_rank', [])) or '–'} | "
                     f"{r.get('statistics_vs_world1', '–')} |")
    return "\n".join(lines)


def checkpointing_table(rows: list[dict]) -> str:
    """Without vs with --gradient-checkpointing, side by side: the stage's peak, the estimate, and (score)
    each pass's peak (markdown)."""
    pairs = {}
    for r in rows:
        pairs.setdefault((r["stage"], r["world_size"], r["sharding"]), {})[r["gradient_checkpointing"]] = r
    lines = ["| stage | N | sharding | what | peak without (MiB) | peak with --gradient-checkpointing (MiB) | with / without |",
             "|---|---|---|---|---|---|---|"]
    for (stage, world, sharding), p in pairs.items():
        if set(p) != {False, True}:
            continue
        items = [("stage peak", p[False]["measured_peak_mib"], p[True]["measured_peak_mib"]),
                 ("estimate", p[False]["estimate_mib"], p[True]["estimate_mib"])]
        items += [(f"pass {name}", v, p[True].get("pass_peak_mib", {}).get(name, float("nan")))
                  for name, v in p[False].get("pass_peak_mib", {}).items()]
        for what, off, on in items:
            lines.append(f"| {stage} | {world} | {sharding} | {what} | {off:.0f} | {on:.0f} | {on / off:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
