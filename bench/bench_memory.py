"""Memory and step time of restricted fine-tuning on SmolLM2-135M (issue 5's benchmark; not a test).

    python bench/bench_memory.py                       # table on stdout + bench/results/memory.json
    python bench/bench_memory.py --seq-len 128 --repeats 3
    python bench/bench_memory.py --seq-len 256 --methods sparse,dense-masked --gradient-checkpointing \
        --loss-chunk 256 --out bench/results/memory_seq256_ckpt.json

Methods, same data and batch, each in its own subprocess (so peaks do not mix):
    sparse        dualsft's SparseAdamW, 10% random element mask over ALL parameters
    dense-masked  dense torch AdamW + gradient masking (the authors' approach), same mask
    full          full fine-tuning, dense AdamW
    lora          peft LoRA r=16, alpha=32, all linear layers
Peak memory = VmHWM (peak RSS) after the steps minus VmRSS right after the model, data and mask are in
memory, weights made resident (the peak is reset there through /proc/self/clear_refs, so model loading does not count);
ru_maxrss is reported too. Step time = median over the timed steps (the first step, which allocates the
optimizer state, is timed apart). Runs are interleaved and repeated; medians are reported. The machine
is shared, so times are noisy: read ratios, not absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("sparse", "dense-masked", "full", "lora")
TARGETS = {"peak(a) <= 0.55 peak(b)": ("sparse", "dense-masked", 0.55, "peak_delta_mb"),
           "peak(a) <= 1.5 peak(d)": ("sparse", "lora", 1.5, "peak_delta_mb"),
           "step(a) <= 1.15 step(b)": ("sparse", "dense-masked", 1.15, "step_s")}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(method: str, seq_len: int, batch: int, steps: int, frac: float, threads: int,
           gradient_checkpointing: bool = False, loss_chunk: int = 0) -> dict:
    """One method in this process: returns its memory and time figures."""
    import torch

    from dualsft.data.formats import TokenizedExample
    from dualsft.models import load_model
    from dualsft.selection.mask import compact_indices
    from dualsft.training.loop import TrainSettings, train_restricted

    torch.set_num_threads(threads)
    model = load_model(None, "float32", "cpu", attn_implementation="sdpa")
    for p in model.parameters():  # weights may be lazily paged in from an mmapped file: make them resident
        p.data = p.data.clone()    # now, or the first step's page-ins would be counted as training memory
    d = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    examples = [TokenizedExample(i, ids := torch.randint(0, vocab, (seq_len,), generator=g).tolist(),
                                 [-100] * 8 + ids[8:], False) for i in range(batch * (steps + 1))]
    mask = None
    if method in ("sparse", "dense-masked"):  # the same seeded 10% element mask for both
        mask = {}
        for name, p in model.named_parameters():
            keep = torch.rand(p.numel(), generator=g) < frac
            mask[name] = compact_indices(keep.nonzero().flatten(), p.numel())
            del keep
    rss0 = _status_kb("VmRSS")
    reset = _reset_peak()
    st = TrainSettings(method=method, batch_size=batch, micro_batch_size=batch, max_steps=steps + 1,
                       checkpoint_every=0, progress=False, max_grad_norm=1.0,
                       gradient_checkpointing=gradient_checkpointing, loss_chunk=loss_chunk)
    res = train_restricted(model, examples, mask, st, pad_token_id=0)
    times = [res.metrics[0]["time"]] + [b["time"] - a["time"] for a, b in zip(res.metrics, res.metrics[1:])]
    hwm = _status_kb("VmHWM")
    k = sum(v.numel() for v in mask.values()) if mask else None
    biggest = max(p.numel() * p.element_size() for p in model.parameters())
    return {"method": method, "d": d, "k": k, "trainable_entries": res.trainable_entries,
            "rss_after_load_mb": rss0 / 1024, "peak_rss_mb": hwm / 1024, "peak_delta_mb": (hwm - rss0) / 1024,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_reset": reset,
            "first_step_s": times[0], "step_s": statistics.median(times[1:]), "step_times_s": times,
            "state_bytes": res.state_bytes,
            "largest_dense_grad_mb": biggest / 2**20 if method == "sparse" else None}


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Median of each figure over the repeats of a method."""
    out = {}
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        row = {key: statistics.median(r[key] for r in rs) for key in
               ("rss_after_load_mb", "peak_rss_mb", "peak_delta_mb", "ru_maxrss_mb", "first_step_s", "step_s")}
        row["analytic_state_mb"] = sum(rs[0]["state_bytes"].values()) / 2**20
        row["state_bytes"] = rs[0]["state_bytes"]
        row["trainable_entries"] = rs[0]["trainable_entries"]
        row["repeats"] = len(rs)
        out[m] = row
    return out


def table(summary: dict[str, dict]) -> str:
    """A markdown table of the medians."""
    lines = ["| method | trainable entries | peak RSS − after load (MB) | peak RSS (MB) | analytic optimizer state "
             "(+grads) (MB) | step (s) | first step (s) |", "|---|---|---|---|---|---|---|"]
    for m, r in summary.items():
        lines.append(f"| {m} | {r['trainable_entries']:,} | {r['peak_delta_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['analytic_state_mb']:.0f} | {r['step_s']:.2f} | {r['first_step_s']:.2f} |")
    return "\n".join(lines)


def check_targets(summary: dict[str, dict]) -> dict[str, dict]:
    """Each target: the measured ratio and whether it is met."""
    out = {}
    for name, (a, b, limit, key) in TARGETS.items():
        if a in summary and b in summary:
            ratio = summary[a][key] / summary[b][key]
            out[name] = {"ratio": round(ratio, 3), "limit": limit, "met": ratio <= limit}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4, help="examples per step (one micro-batch)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    ap.add_argument("--frac", type=float, default=0.1, help="fraction of entries in the random element mask")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: steadier on a shared machine)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--gradient-checkpointing", action="store_true", help="every method with activation checkpointing")
    ap.add_argument("--loss-chunk", type=int, default=0, help="every method's LM head + loss N positions at a time")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    knobs = (args.seq_len, args.batch, args.steps, args.frac, args.threads, args.gradient_checkpointing,
             args.loss_chunk)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, *knobs)))
        return 0
    runs, t0 = [], time.time()
    methods = args.methods.split(",")
    for rep in range(args.repeats):  # interleaved: a, b, c, d, a, b, c, d ...
        for m in methods:
            cmd = [sys.executable, __file__, "--worker", m, "--seq-len", str(args.seq_len), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--frac", str(args.frac), "--threads", str(args.threads),
                   "--loss-chunk", str(args.loss_chunk)] + (["--gradient-checkpointing"] * args.gradient_checkpointing)
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            runs.append(json.loads(line[0][7:]))
            r = runs[-1]
            print(f"[{time.time() - t0:5.0f}s] rep {rep} {m}: peak Δ {r['peak_delta_mb']:.0f} MB, "
                  f"step {r['step_s']:.2f} s", flush=True)
    summary = summarise(runs)
    targets = check_targets(summary)
    out = {"setup": {"model": "SmolLM2-135M-Instruct (float32, sdpa)", "seq_len": args.seq_len, "batch": args.batch,
                     "timed_steps": args.steps, "mask_fraction": args.frac, "threads": args.threads,
                     "repeats": args.repeats, "gradient_checkpointing": args.gradient_checkpointing,
                     "loss_chunk": args.loss_chunk, "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()},
           "summary": summary, "targets": targets, "runs": runs, "bench_wall_s": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(table(summary))
    for name, t in targets.items():
        print(f"{name}: ratio {t['ratio']} -> {'met' if t['met'] else 'MISSED'}")
    print(f"wrote {args.out} ({out['bench_wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
