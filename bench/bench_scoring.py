"""Scoring cost, side by side in one run (issue 3): the pool passes of DualSFT against a plain training pass.

    python bench/bench_scoring.py --n 64 --batch-size 4 --repeats 3

Variants, all over the same length-sorted pool batches (the target/anchor passes are common to every
variant and excluded):
    (i)   plain       one training pass: forward + backward of the summed loss (= G)
    (ii)  order1      first-order scoring: G and φ_data in ONE pass (ghost hooks; and jvp dual numbers)
    (iii) order2      second-order scoring: pass 1 G (= plain) + pass 2 row scores (ghost; and jvp)
    (iv)  oracle      one backward per example (--method exact), on --oracle-n examples, scaled to N
Timings are interleaved (each repeat runs every variant once), ratios are taken within a repeat, and the
table shows medians: the machines are shared and noisy. Peak memory: each variant once in its own
subprocess, reporting the peak growth of the resident set sampled every 5 ms (CPU) or of
torch.cuda.max_memory_allocated (GPU) over the state after loading the model and data. Writes bench/results/scoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dualsft.data.formats import batches, normalise_record, tokenize_examples
from dualsft.models import load_model, load_tokenizer
from dualsft.scoring.rows import score_pool
from dualsft.scoring.stats import gradient_sum, trainable_params
from dualsft.testing import byte_tokenizer, micro_llama

VARIANTS = ("plain", "order1_ghost", "order1_jvp", "rows_ghost", "rows_jvp", "oracle")
TASKS = ("basic_arithmetic", "gsm_symbolic", "chain_sum", "leg_counting")


def pool_records(n: int) -> list[dict]:
    """n real instruction/answer items from reasoning-gym, mixed over a few tasks (seeded)."""
    import reasoning_gym

    per = -(-n // len(TASKS))
    out = []
    for k, task in enumerate(TASKS):
        for item in reasoning_gym.create_dataset(task, size=per, seed=1 + k):
            out.append({"question": item["question"], "answer": str(item["answer"])})
    return out[:n]


def setup(model_name: str, n: int, batch_size: int, max_length: int, dtype: str, device: str) -> tuple[Any, list, dict]:
    """Model, length-sorted pool batches and a direction u (random, scaled like η·v)."""
    if model_name == "micro":
        tok, model = byte_tokenizer(), micro_llama(tied=True, seed=0).to(device)
    else:
        tok, model = load_tokenizer(None), load_model(None, dtype, device)
    ex = [normalise_record(r, "bench", i) for i, r in enumerate(pool_records(2 * n))]
    toks = tokenize_examples(ex, tok, "chat", max_length, drop_empty=True)[:n]  # n examples that fit max_length
    bs = batches(toks, batch_size, tok.pad_token_id, sort_by_length=True)
    g = torch.Generator().manual_seed(0)
    u = {k: 2e-5 * torch.randn(p.shape, generator=g).to(p.device) for k, p in trainable_params(model).items()}
    return model, bs, u


def oracle_batches(bs: list, oracle_n: int) -> list:
    """Evenly spaced batches (the pool is length-sorted: the first ones are the shortest) with ~oracle_n examples."""
    k = max(1, min(len(bs), oracle_n // int(bs[0]["input_ids"].shape[0])))
    return [bs[round(i * (len(bs) - 1) / max(1, k - 1))] for i in range(k)] if k > 1 else [bs[len(bs) // 2]]


def variant_fn(name: str, model: Any, bs: list, u: dict, oracle_n: int) -> Callable[[], None]:
    params = trainable_params(model)
    oracle_bs = oracle_batches(bs, oracle_n)
    return {
        "plain": lambda: gradient_sum(model, bs, params),
        "order1_ghost": lambda: score_pool(model, bs, u, "ghost", grad_sum=True),
        "order1_jvp": lambda: score_pool(model, bs, u, "jvp", grad_sum=True),
        "rows_ghost": lambda: score_pool(model, bs, u, "ghost"),
        "rows_jvp": lambda: score_pool(model, bs, u, "jvp"),
        "oracle": lambda: score_pool(model, oracle_bs, u, "exact"),
    }[name]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_all(args: argparse.Namespace, model_name: str) -> dict[str, Any]:
    model, bs, u = setup(model_name, args.n, args.batch_size, args.max_length, args.dtype, args.device)
    N = sum(int(b["input_ids"].shape[0]) for b in bs)
    oracle_examples = sum(int(b["input_ids"].shape[0]) for b in oracle_batches(bs, args.oracle_n))
    fns = {v: variant_fn(v, model, bs, u, args.oracle_n) for v in args.variants.split(",")}
    gradient_sum(model, bs[:1], trainable_params(model))  # warm-up (lazy init, allocator) on one batch
    times: dict[str, list[float]] = {v: [] for v in fns}
    for r in range(args.repeats):
        for v, fn in fns.items():
            sync(args.device)
            t0 = time.perf_counter()
            fn()
            sync(args.device)
            dt = time.perf_counter() - t0
            times[v].append(dt * (N / oracle_examples if v == "oracle" else 1.0))
            print(f"  [{model_name} repeat {r}] {v:13s} {dt:8.2f} s", file=sys.stderr, flush=True)
    ratios = {k: x for k, x in ratios_of(times).items() if x}
    lengths = [int(b["attention_mask"].sum(1).max()) for b in bs]
    return {"N": N, "batch_size": args.batch_size, "max_tokens": max(lengths),
            "mean_tokens": sum(int(b["attention_mask"].sum()) for b in bs) / N, "oracle_examples": oracle_examples,
            "times_s": times, "median_s": {v: statistics.median(t) for v, t in times.items()},
            "ratios": {k: statistics.median(x) for k, x in ratios.items()}, "ratios_all": ratios}


def ratios_of(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per-repeat ratios to the plain pass (order 2 = plain pass + rows pass); empty where not measured."""
    times = {v: times.get(v, []) for v in VARIANTS}
    return {
        "(ii) order1 ghost / plain": [a / p for a, p in zip(times["order1_ghost"], times["plain"])],
        "(ii) order1 jvp / plain": [a / p for a, p in zip(times["order1_jvp"], times["plain"])],
        "(iii) order2 ghost / plain": [(p + a) / p for a, p in zip(times["rows_ghost"], times["plain"])],
        "(iii) order2 jvp / plain": [(p + a) / p for a, p in zip(times["rows_jvp"], times["plain"])],
        "(iv) oracle / plain": [a / p for a, p in zip(times["oracle"], times["plain"])],
    }


def worker(args: argparse.Namespace) -> None:
    """Child process: load, then run ONE variant once; print the peak-memory growth in MiB as JSON."""
    model, bs, u = setup(args.model, args.n, args.batch_size, args.max_length, args.dtype, args.device)
    fn = variant_fn(args.worker, model, bs, u, args.oracle_n)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        print(json.dumps({"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}))
        return
    # ru_maxrss is a lifetime peak (model loading already set it), so sample the resident set during the run
    base, peak, done = rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fn()
    done.set()
    t.join()
    print(json.dumps({"peak_mib": max(peak[0], rss_mib()) - base}))


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_all(args: argparse.Namespace, model_name: str) -> dict[str, float]:
    out = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--worker", v, "--model", model_name, "--n", str(args.mem_n),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--dtype", args.dtype,
               "--device", args.device, "--threads", str(args.threads), "--oracle-n", str(min(args.oracle_n, args.mem_n))]
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        out[v] = json.loads(lines[-1])["peak_mib"] if lines else float("nan")
        print(f"  [{model_name} memory] {v:13s} {out[v]:8.1f} MiB", file=sys.stderr, flush=True)
    return out


def table(model_name: str, r: dict[str, Any]) -> str:
    m, mem = r["median_s"], r.get("peak_mib", {})
    rows = [("(i) plain pass (fwd+bwd, = G)", m["plain"], 1.0, mem.get("plain")),
            ("(ii) order 1, ghost (G + rows, one pass)", m["order1_ghost"], r["ratios"]["(ii) order1 ghost / plain"],
             mem.get("order1_ghost")),
            ("(ii) order 1, jvp (G + rows, one pass)", m["order1_jvp"], r["ratios"]["(ii) order1 jvp / plain"],
             mem.get("order1_jvp")),
            ("(iii) order 2, ghost (G pass + rows pass)", m["plain"] + m["rows_ghost"],
             r["ratios"]["(iii) order2 ghost / plain"], mem.get("rows_ghost")),
            ("(iii) order 2, jvp (G pass + rows pass)", m["plain"] + m["rows_jvp"],
             r["ratios"]["(iii) order2 jvp / plain"], mem.get("rows_jvp")),
            (f"(iv) exact oracle (timed on {r['oracle_examples']}, scaled)", m["oracle"],
             r["ratios"]["(iv) oracle / plain"], mem.get("oracle"))]
    lines = [f"\n{model_name}: N={r['N']} B={r['batch_size']} tokens mean {r['mean_tokens']:.0f} max {r['max_tokens']}",
             "| variant | time (s) | / plain | ex/s | peak mem growth (MiB) |", "|---|---|---|---|---|"]
    for name, t, ratio, pm in rows:
        pm_s = f"{pm:.0f}" if pm is not None else "-"
        lines.append(f"| {name} | {t:.2f} | {ratio:.2f} | {r['N'] / t:.1f} | {pm_s} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=64, help="pool examples")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--oracle-n", type=int, default=8, help="examples the oracle is timed on (scaled to N)")
    p.add_argument("--mem-n", type=int, default=8, help="examples per memory subprocess")
    p.add_argument("--models", default="smollm2,micro")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a shared 2-core box, 2 threads oversubscribe and run ~10x slower)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="skip timings (e.g. to add memory to a results file)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "scoring.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    # the output path is recorded relative to where the bench ran: results never name this machine's folders
    config = {**vars(args), "out": os.path.relpath(args.out)}
    results: dict[str, Any] = {"config": config, "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name in args.models.split(","):
        if args.memory_only:
            print(json.dumps({name: memory_all(args, name)}), flush=True)
            continue
        r = time_all(args, name)
        if not args.no_memory:
            r["peak_mib"] = memory_all(args, name)
        results[name] = r
        if set(args.variants.split(",")) == set(VARIANTS):
            print(table(name, r), flush=True)
        else:
            print(json.dumps({name: {"median_s": r["median_s"], "ratios": r["ratios"]}}, indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
