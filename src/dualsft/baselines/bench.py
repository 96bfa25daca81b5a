"""Measure LESS featurisation speed: batched hooks vs one backward per example (the oracle loop).

    python -m dualsft.baselines.bench --model smollm2-135m --n 16 --batch 8 --loop-n 4 --max-length 128 --threads 1

Both paths compute the same thing: Adam-preconditioned per-example gradients of every featurised linear
layer, projected to --dim coordinates by the same sketch. Prints examples/s of each and the max
relative difference of their features.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dualsft.baselines.cost import Cost
from dualsft.baselines.less import LessConfig, make_transform, projected_grads
from dualsft.baselines.pergrad import linear_layers, per_example_grads_loop
from dualsft.baselines.sketch import SignFoldSketch


def demo_batches(tokenizer, n: int, batch: int, max_length: int) -> list[dict]:
    """n reasoning-style examples (toy arithmetic with a long worked response) as collated batches."""
    from dualsft.data.formats import batches, normalise_record, tokenize_examples
    from dualsft.testing import toy_records

    recs = [{"instruction": r["instruction"] + " Explain each step.",
             "response": " ".join([f"Step {j}: add the tens, then the units." for j in range(6)]) + r["response"]}
            for r in toy_records(n)]
    ex = [normalise_record(r, "bench", i) for i, r in enumerate(recs)]
    return batches(tokenize_examples(ex, tokenizer, "chat", max_length), batch, tokenizer.pad_token_id)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--loop-n", type=int, default=4)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--modules", default=None, help="regex restricting the featurised layers (LessConfig.modules)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dualsft.models import load_model, load_tokenizer

    model, tok = load_model(args.model, dtype="float32", device="cpu"), load_tokenizer(args.model)
    data = demo_batches(tok, args.n, args.batch, args.max_length)
    import re

    layers = [ly for ly in linear_layers(model) if args.modules is None or re.search(args.modules, ly.module_name)]
    c = {n: torch.full_like(p, 1e-8) for n, p in model.named_parameters()}
    cfg = LessConfig(dim=args.dim)
    tr = make_transform(cfg, c, None, None, torch.float32, use_precondition=True)
    sk = SignFoldSketch(args.dim, seed=0)
    projected_grads(model, data[:1], layers, sk, tr, Cost())  # warm-up (sign caches, allocator)
    t0 = time.perf_counter()
    feats, _ = projected_grads(model, data, layers, sk, tr, Cost())
    batched_s = time.perf_counter() - t0
    names = [n for ly in layers for n in (ly.weight, ly.bias) if n]
    one = data[0]
    inputs = {k: one[k][: args.loop_n] for k in ("input_ids", "attention_mask", "labels")}
    t0 = time.perf_counter()
    z = sk.new_buffer(args.loop_n, torch.float32)
    for i in range(args.loop_n):  # one example at a time; project each parameter as it is produced
        g = per_example_grads_loop(model, {k: v[i:i + 1] for k, v in inputs.items()}, names)
        for n in names:
            sk.add(z[i:i + 1], n, tr(n, g[n]).reshape(1, -1))
    loop_feats = sk.finish(z)
    loop_s = time.perf_counter() - t0
    rel = float((loop_feats - feats[: args.loop_n]).norm() / feats[: args.loop_n].norm())
    tokens = float(sum(b["attention_mask"].sum() for b in data)) / args.n
    print(json.dumps({"model": args.model, "featurised_entries": sum(dict(model.named_parameters())[n].numel()
                                                                     for n in names),
                      "mean_tokens": round(tokens, 1), "batch": args.batch, "dim": args.dim,
                      "batched_examples_per_s": round(args.n / batched_s, 3),
                      "loop_examples_per_s": round(args.loop_n / loop_s, 3),
                      "speedup": round((args.n / batched_s) / (args.loop_n / loop_s), 2),
                      "feature_rel_diff": rel, "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
