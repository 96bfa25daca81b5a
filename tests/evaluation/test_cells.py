"""compare's table cells: per-item scores from predictions.jsonl, CIs and paired verdicts (lower loss wins)."""

from __future__ import annotations

from dualsft.evaluation.cells import fmt_interval, item_scores, method_cells, paired_cells
from dualsft.io import write_jsonl


def rows(model: str, correct: list[bool], loss: list[float]) -> list[dict]:
    test = [{"model": model, "split": "test", "task": "gcd", "index": i, "correct": c, "loss": v}
            for i, (c, v) in enumerate(zip(correct, loss))]
    general = [{"model": model, "split": "stability", "task": "humaneval", "index": 0, "loss": 1.0, "kl": 0.5}]
    return test + general


def test_item_scores_group_rows_by_metric(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", rows("tuned", [True, False], [1.0, 2.0]) + rows("base", [False, False], [3, 3]))
    got = item_scores(tmp_path / "p.jsonl", "tuned")
    assert got["target acc"] == {("gcd", 0): 1.0, ("gcd", 1): 0.0}
    assert got["target loss"] == {("gcd", 0): 1.0, ("gcd", 1): 2.0}
    assert got["general KL"] == {("humaneval", 0): 0.5} and "stability loss" not in got


def test_paired_verdicts_mean_better_for_the_reference():
    q = 40
    ref = {"target acc": [{("t", i): 1.0 for i in range(q)}] * 2, "target loss": [{("t", i): 1.0 for i in range(q)}] * 2}
    other = {"target acc": [{("t", i): float(i % 4 == 0) for i in range(q)}] * 2,
             "target loss": [{("t", i): 2.0 + 0.01 * i for i in range(q)}] * 2}
    cells = paired_cells(ref, other)
    assert cells["target acc"]["verdict"] == "win" and cells["target acc"]["diff"]["mean"] > 0
    assert cells["target loss"]["verdict"] == "win" and cells["target loss"]["diff"]["mean"] < 0  # lower loss wins
    assert paired_cells(other, ref)["target loss"]["verdict"] == "loss"
    ci = method_cells(ref)["target acc"]
    assert (ci["mean"], ci["low"], ci["high"], ci["n_seeds"], ci["n_examples"]) == (1.0, 1.0, 1.0, 2, q)
    assert fmt_interval(ci, pct=True) == "100.0 [100.0, 100.0]" and fmt_interval(None) == "—"
