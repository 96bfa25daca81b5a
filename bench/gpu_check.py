"""GPU readiness check (issue 14): warm-up, score, select and sparse training of random-initialised Llama
configs in bf16, with peak memory, examples/s and the ratio to a plain bf16 training pass.

    bash bench/gpu_check.sh                         # on a CUDA machine: the 1B and 3B configs, at most ~8 min
    python bench/gpu_check.py --tiny --device cpu   # the same path on a micro config (what the CPU test runs)

Nothing is downloaded: each model is a transformers LlamaConfig with random weights (Llama-3.2-1B/3B shapes,
vocabulary 128256) saved with the byte-level tokenizer of dualsft.testing, and the data are synthetic
instruction records of about --seq-len tokens. The stages run in this process through their own ``main``
(the same code as `dualsft warmup|score|select|train`); each stage's peak memory is
torch.cuda.max_memory_allocated after a reset (on CPU: the process's peak RSS growth, a coarse figure).
A size that runs out of memory is reported as OOM and the next one runs.

The reference ("plain") is one bf16 full fine-tuning pass with torch AdamW at the same micro-batch and
sequence length: its examples/s and peak memory are the denominators of the ratio columns.
Prints a table and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing

# Llama-3.2-1B / -3B shapes (hidden, intermediate, layers, heads, kv heads); "tiny" is for the CPU smoke test
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 128, 2, 4, 2),
    "1b": (2048, 8192, 16, 32, 8),
    "3b": (3072, 8192, 28, 24, 8),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1b,3b", help=f"comma list of {sorted(SIZES)}")
    p.add_argument("--tiny", action="store_true", help="the micro config only (CPU smoke test)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per example (about)")
    p.add_argument("--pool", type=int, default=64, help="pool examples (scored)")
    p.add_argument("--val", type=int, default=16, help="target examples")
    p.add_argument("--micro-batch", type=int, default=4, help="examples per forward/backward")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary of the random model")
    p.add_argument("--no-checkpointing", action="store_true", help="run without --gradient-checkpointing")
    p.add_argument("--loss-chunk", type=int, default=1024, help="warm-up and training --loss-chunk (0: full logits)")
    p.add_argument("--work", default="", help="scratch folder (default: a temporary one, deleted)")
    p.add_argument("--out", default="bench/results/gpu_check.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.vocab = "tiny", 512
    return args


def synthetic_records(n: int, seq_len: int, seed: int) -> list[dict]:
    """n instruction records of about ``seq_len`` byte tokens (1 token per character with the byte tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "sum", "of", "the", "numbers", "answer", "is", "count", "legs"]
    out = []
    for i in range(n):
        idx = torch.randint(len(words), (seq_len // 5,), generator=g).tolist()
        text = " ".join(words[j] for j in idx)
        cut = max(8, len(text) // 4)
        out.append({"instruction": f"Task {i}: {text[:cut]}", "response": text[cut:seq_len - 32]})
    return out


def make_model_dir(size: str, vocab: int, device: str, folder: Path) -> int:
    """A random-initialised Llama of ``size`` in bf16 (float32 on CPU) saved with the byte tokenizer; returns
    its parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dualsft.testing import byte_tokenizer

    hidden, inter, layers, heads, kv = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=True, rope_theta=500000.0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(folder), safe_serialization=True)
    byte_tokenizer().save_pretrained(str(folder))
    del model
    return n


class Peak:
    """Peak memory of a block: CUDA max_memory_allocated after a reset, or the growth of the peak RSS on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> Peak:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.t0 = time.time()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.rss0
        self.wall = time.time() - self.t0


def plain_pass(model_dir: Path, pool: Path, args: argparse.Namespace, steps: int) -> dict[str, float]:
    """The reference: full bf16 fine-tuning with torch AdamW, ``steps`` micro-batches (after one untimed)."""
    from dualsft.data.formats import collate, load_examples, tokenize_examples
    from dualsft.losses import per_example_loss
    from dualsft.models import load_model, load_tokenizer

    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    tok = load_tokenizer(str(model_dir))
    toks = tokenize_examples(load_examples(pool), tok, "chat", args.seq_len)
    with Peak(args.device) as peak:
        model = load_model(str(model_dir), dtype, args.device, attn_implementation="sdpa").train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        t_run, done = 0.0, 0
        for s in range(steps + 1):
            batch = collate(toks[(s * args.micro_batch) % len(toks):][:args.micro_batch], tok.pad_token_id)
            batch = {k: v.to(args.device) for k, v in batch.items()}
            t0 = time.time()
            per_example_loss(model, batch).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if s:  # the first step (allocations, kernel choice) is not timed
                t_run += time.time() - t0
                done += len(batch["input_ids"])
        del model, opt
    return {"examples_per_s": done / t_run, "peak_bytes": peak.bytes, "wall_s": peak.wall}


def run_stages(model_dir: Path, run: Path, data: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """warm-up, score, select, sparse train through the stages' own main(); per stage wall, examples/s, peak."""
    from dualsft.scoring import score, warmup
    from dualsft.selection import select
    from dualsft.training import train

    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    common = dict(model=str(model_dir), dtype=dtype, device=args.device, run_dir=str(run), max_length=args.seq_len)
    ckpt = not args.no_checkpointing
    warm_n = max(args.micro_batch * 2, args.pool // 4)
    stages = {
        "warmup": (warmup.main, warmup.WarmupConfig(**common, pool=str(data / "pool.jsonl"),
                                                    warmup_ratio=warm_n / args.pool, batch_size=args.micro_batch * 2,
                                                    micro_batch_size=args.micro_batch, gradient_checkpointing=ckpt,
                                                    loss_chunk=args.loss_chunk),
                   warm_n),
        "score": (score.main, score.ScoreConfig(**common, pool=str(data / "pool.jsonl"),
                                                target=str(data / "val.jsonl"), batch_size=args.micro_batch,
                                                gradient_checkpointing=ckpt),
                  2 * args.pool + 2 * args.val),  # order 2: G pass + row pass over the pool; V twice (the
                  # default normalized target: a norm pass, then the weighted gradient pass); `dualsft score`'s
                  # default formula (LESS's form, Adam-step u from the warm-up's c), as users run it
        "select": (select.main, select.SelectConfig(run_dir=str(run), plot=False), 0),
        "train": (train.main, train.TrainConfig(**common, epochs=2, batch_size=args.micro_batch,
                                                micro_batch_size=args.micro_batch, lr=1e-5, progress=False,
                                                checkpoint_every=0, gradient_checkpointing=ckpt,
                                                loss_chunk=args.loss_chunk),
                  2 * max(1, args.pool // 10)),  # select's default budget: 10% of the pool, 2 epochs
    }
    out = {}
    for name, (main, cfg, examples) in stages.items():
        with Peak(args.device) as peak:
            main(cfg)
        compute_s = compute_seconds(name, run)
        out[name] = {"wall_s": peak.wall, "compute_s": compute_s, "examples": examples, "peak_bytes": peak.bytes,
                     "examples_per_s": examples / compute_s if examples and compute_s else float("nan")}
    return out


def compute_seconds(stage: str, run: Path) -> float | None:
    """The stage's own compute time, without model loading and writing: the warm-up's and training's loop
    time, the sum of the scoring passes' wall times (what examples/s is measured over)."""
    from dualsft.io import read_json, read_jsonl

    if stage == "warmup":
        return read_json(run / "warmup" / "summary.json").get("loop_wall_s")
    if stage == "score":
        return sum(t["wall_time_s"] for t in read_json(run / "scores" / "summary.json")["timings"].values())
    if stage == "train":
        return read_jsonl(run / "train" / "metrics.jsonl")[-1]["time"]
    return None


def check_size(size: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One size: model, data, the reference pass, the stages. OOM is caught and recorded."""
    from dualsft.io import write_jsonl

    folder = work / size
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "pool.jsonl", synthetic_records(args.pool, args.seq_len, 0))
    write_jsonl(data / "val.jsonl", synthetic_records(args.val, args.seq_len, 1))
    row: dict[str, Any] = {"size": size, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                           "gradient_checkpointing": not args.no_checkpointing, "loss_chunk": args.loss_chunk}
    try:
        t0 = time.time()
        row["params"] = make_model_dir(size, args.vocab, args.device, folder / "model")
        row["model_build_s"] = time.time() - t0
        row["plain"] = plain_pass(folder / "model", data / "pool.jsonl", args, steps=4)
        row["stages"] = run_stages(folder / "model", folder / "run", data, args)
    except torch.cuda.OutOfMemoryError as e:  # a size that does not fit is a result, not a crash
        row["error"] = f"OOM: {str(e).splitlines()[0]}"
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict[str, Any]]) -> str:
    gib = 2 ** 30
    lines = ["| size | stage | wall s (with loading) | examples/s (compute) | peak GiB | speed vs plain | "
             "memory vs plain |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | — | — | — | — | {r['error']} | |")
            continue
        p = r["plain"]
        lines.append(f"| {r['size']} ({r['params'] / 1e9:.2f}B) | plain bf16 AdamW | {p['wall_s']:.1f} | "
                     f"{p['examples_per_s']:.2f} | {p['peak_bytes'] / gib:.2f} | 1.00 | 1.00 |")
        for name, s in r["stages"].items():
            speed = s["examples_per_s"] / p["examples_per_s"] if s["examples"] else float("nan")
            lines.append(f"| {r['size']} | {name} | {s['wall_s']:.1f} | {s['examples_per_s']:.2f} | "
                         f"{s['peak_bytes'] / gib:.2f} | {speed:.2f} | {s['peak_bytes'] / max(p['peak_bytes'], 1):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --tiny --device cpu for the CPU smoke test", file=sys.stderr)
        return 2
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        print(f"gpu_check: unknown size(s) {unknown}; use {sorted(SIZES)}", file=sys.stderr)
        return 2
    ctx = tempfile.TemporaryDirectory(prefix="gpu_check_") if not args.work else None
    work = Path(args.work or ctx.name)  # type: ignore[union-attr]
    rows = []
    try:
        for size in sizes:
            rows.append(check_size(size, args, work))
            print(table(rows[-1:]), flush=True)
    finally:
        if ctx is not None:
            ctx.cleanup()
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
           else "cpu", "threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    print("\n" + table(rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
