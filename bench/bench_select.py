"""Selection at SmolLM2 scale: time and peak memory of `dualsft select` against the size of the scores.

    python bench/bench_select.py            # prints a table, writes bench/results/select.json

Fabricates a run folder with random φ_param shaped like SmolLM2-135M's trainable parameters (134.5M
entries, tied embedding once; shapes from `load_model(None)`), a 10,000-example pool with random φ_data,
and the metadata `dualsft select` checks. Then runs `dualsft select` in a fresh process per setting
(no model pass: scores only) and reads its peak RSS from the OS. "baseline" is the peak RSS of a process
that imports the same modules and loads nothing, so RSS - baseline is what the selection itself holds.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dualsft.io import save_tensors, write_json, write_jsonl
from dualsft.runs import build_metadata

SETTINGS = [
    ("10%/10%, quotas 0.2/0.2 (defaults)", []),
    ("10%/10%, no quotas", ["--quota-layer", "0", "--quota-module", "0"]),
    ("5%/1%, abs, exclude embeddings", ["--data-budget", "0.05", "--param-budget", "0.01", "--sign", "abs",
                                          "--exclude", "embed"]),
    ("10%/10%, block:16x16", ["--granularity", "block:16x16"]),
]
N_POOL = 10_000


def smollm2_shapes() -> dict[str, tuple[int, ...]]:
    """Trainable parameter shapes of the embedded SmolLM2-135M (tied weights once)."""
    from dualsft.models import load_model

    model = load_model(None, dtype="float32", device="cpu")
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def fabricate_run(run: Path) -> tuple[int, int]:
    """Write RUN/scores for random scores; returns (bytes of param_scores.safetensors, entries d)."""
    shapes = smollm2_shapes()
    g = torch.Generator().manual_seed(1234)
    scores = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    d = sum(t.numel() for t in scores.values())
    scores["model.embed_tokens.weight"][10_000:] = 0.0  # unused vocabulary rows: exact zeros, as in real G
    save_tensors(run / "scores" / "param_scores.safetensors", scores)
    del scores
    pool = run / "pool.jsonl"
    write_jsonl(pool, [{"instruction": f"q{i}", "response": f"a{i}", "task": f"t{i % 5}"} for i in range(N_POOL)])
    phi = torch.randn(N_POOL, generator=g).tolist()
    write_jsonl(run / "scores" / "data_scores.jsonl", [{"index": i, "score": s, "loss": 1.0} for i, s in enumerate(phi)])
    write_json(run / "scores" / "metadata.json",
               build_metadata("scores", {"eta": 2e-5, "order": 2}, "smollm2-135m", "fabricated", {"pool": pool}))
    return (run / "scores" / "param_scores.safetensors").stat().st_size, d


# VmHWM (this process image's peak RSS) rather than ru_maxrss: Linux carries ru_maxrss over from the
# forking parent across exec, so a child of this (large) bench process would report the parent's size.
WRAP = ("import resource\n{imports}\n"
        "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1]\n"
        "ru = resource.getrusage(resource.RUSAGE_SELF)\n"
        "print('PEAK_RSS_KIB', hwm, ru.ru_utime + ru.ru_stime)")


def child_peak_rss(code: str) -> tuple[float, float, float]:
    """Run python code in a fresh process; return (wall s, its CPU s, its peak RSS in MiB)."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", WRAP.format(imports=code)], check=True, capture_output=True, text=True)
    wall = time.time() - t0
    _, kib, cpu = next(ln for ln in p.stdout.splitlines() if ln.startswith("PEAK_RSS_KIB")).split()
    return wall, float(cpu), int(kib) / 1024


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench_select_"))
    run = root / "run"
    nbytes, d = fabricate_run(run)
    _, _, base = child_peak_rss("import dualsft.cli, dualsft.selection.select, dualsft.data.formats, matplotlib.pyplot")
    rows = []
    for i, (label, extra) in enumerate(SETTINGS):
        out = f"sel{i}"
        argv = ["select", "--run-dir", str(run), "--out", out, *extra]
        wall, cpu, rss = child_peak_rss(f"from dualsft.cli import main\nassert main({argv!r}) == 0")
        summary = json.loads((run / out / "summary.json").read_text())
        rows.append({"setting": label, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                     "select_s": round(summary["timing_s"]["total"], 2),
                     "mask_s": round(summary["timing_s"]["mask_selection"], 2), "peak_rss_mib": round(rss),
                     "rss_over_baseline_mib": round(rss - base), "rss_over_scores": round(rss / (nbytes / 2**20), 2),
                     "k": summary["param"]["k"], "selected": summary["param"]["selected"], "b": summary["data"]["b"]})
    result = {"scores_mib": round(nbytes / 2**20), "entries": d, "baseline_rss_mib": round(base),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "loadavg": os.getloadavg()}, "rows": rows}
    print(f"param_scores: {result['scores_mib']} MiB, {result['entries']:,} entries; baseline process RSS "
          f"{result['baseline_rss_mib']} MiB; load average {os.getloadavg()[0]:.1f}")
    cols = [("setting", "setting", "40s"), ("wall_s", "wall s", "7.2f"), ("cpu_s", "cpu s", "6.2f"),
            ("select_s", "stage s", "8.2f"), ("mask_s", "mask s", "7.2f"), ("peak_rss_mib", "peak MiB", "9d"),
            ("rss_over_baseline_mib", "-base", "6d"), ("rss_over_scores", "x scores", "9.2f")]
    print(" ".join(f"{title:{'<' if key == 'setting' else '>'}{fmt[:-1].split('.')[0]}s}" for key, title, fmt in cols))
    for r in rows:
        print(" ".join(f"{r[key]:{fmt}}" for key, _, fmt in cols))
    out = Path(__file__).parent / "results" / "select.json"
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
