"""The README stays true: its two commands are the ones CI runs, and its Python snippet runs (on a
micro model instead of SmolLM2, same code)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dualsft.testing import one_torch_thread, toy_records

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


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
