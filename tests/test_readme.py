"""The README stays true: its two commands are the ones CI runs, and its Python snippets run (on a
micro model instead of SmolLM2, same code)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dualsft.io import write_jsonl
from dualsft.models import load_model
from dualsft.selection.mask import compact_indices, save_mask
from dualsft.testing import one_torch_thread, toy_records

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def python_block(first_line: str) -> str:
    """The body (after its first line) of the README's python block whose first line starts with ``first_line``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if b.startswith(first_line)]
    assert len(blocks) == 1, f"expected one python block starting with {first_line!r}"
    return blocks[0].split("\n", 1)[1]


def test_the_two_commands_come_first_and_ci_runs_the_test_command():
    first, second = bash_blocks()[:2]
    assert first.strip().endswith("dualsft run")
    assert second.strip().endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert second.strip() in ci


def test_python_api_snippet_runs(tmp_path, micro_model_dir):
    code = re.search(r"```python\n(.*?)```", README, flags=re.S).group(1)
    first, rest = code.split("\n", 1)
    assert first.startswith("MODEL, POOL, TARGET =")
    for name, n in (("pool", 20), ("val", 4)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_records(n, seed=n)))
    env = {"MODEL": str(micro_model_dir), "POOL": str(tmp_path / "pool.jsonl"), "TARGET": str(tmp_path / "val.jsonl")}
    with one_torch_thread():
        exec(compile(rest, "README.md", "exec"), env)
    assert len(env["chosen"]) == 2 and sum(t.numel() for t in env["mask"].values()) == round(0.1 * sum(
        p.numel() for p in env["params"].values()))
    assert env["result"].completed


def test_trainer_snippet_runs(tmp_path, micro_model_dir, monkeypatch):
    """The "Use with Trainer" snippet on a run folder holding a selection (4 examples, a 5% mask)."""
    pytest.importorskip("datasets")
    rest = python_block("RUN, MODEL =")
    run = tmp_path / "run"
    write_jsonl(run / "selection" / "subset.jsonl", [{**r, "index": i} for i, r in enumerate(toy_records(4))])
    base = load_model(str(micro_model_dir))
    g = torch.Generator().manual_seed(0)
    mask = {n: compact_indices(torch.randperm(p.numel(), generator=g)[: max(1, p.numel() // 20)], p.numel())
            for n, p in base.named_parameters()}
    save_mask(run / "selection" / "mask.safetensors", mask, {n: tuple(p.shape) for n, p in base.named_parameters()})
    monkeypatch.chdir(tmp_path)
    env = {"RUN": str(run), "MODEL": str(micro_model_dir)}
    with one_torch_thread():
        exec(compile(rest, "README.md", "exec"), env)
    assert env["trainer"].state.global_step == 3 and env["opt"].last_grad_norm > 0
    trained, changed = env["model"], 0
    for (n, p), (_, q) in zip(trained.named_parameters(), base.named_parameters()):
        outside = torch.ones(p.numel(), dtype=torch.bool)
        outside[mask[n].long()] = False
        assert torch.equal(p.detach().view(-1)[outside], q.view(-1)[outside]), n
        changed += int(p.detach().ne(q).sum())
    assert changed > 0 and (run / "trainer" / "config.json").exists()
