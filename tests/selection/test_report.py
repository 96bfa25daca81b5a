"""The subset's composition beside the pool's: by task, source and (where records have one) answer type."""

from __future__ import annotations

import pytest

from dualsft.selection.report import composition_table, subset_overlap


def rec(task: str, answer_type: str | None, source: str = "reasoning_gym") -> dict:
    r = {"task": task, "source": source}
    return r if answer_type is None else {**r, "answer_type": answer_type}


POOL = ([rec("chain_sum", "1-digit")] * 6 + [rec("chain_sum", "2-digit")] * 2 + [rec("products", "2-digit")] * 10
        + [rec("humaneval", None, "human_eval")] * 2)
CHOSEN = [rec("chain_sum", "1-digit")] * 1 + [rec("chain_sum", "2-digit")] * 2 + [rec("products", "2-digit")] * 4 \
    + [rec("humaneval", None, "human_eval")]


def test_composition_by_task_and_answer_type():
    o = subset_overlap(POOL, CHOSEN)
    assert set(o) == {"task", "source", "answer_type"}
    assert o["task"]["chain_sum"] == {"pool": 8, "selected": 3, "share_of_pool": 0.4, "share_of_subset": 3 / 8,
                                      "share_of_value_selected": 3 / 8}
    at = o["answer_type"]
    assert list(at) == ["chain_sum/1-digit", "chain_sum/2-digit", "products/2-digit"]  # per task, untyped left out
    assert (at["chain_sum/2-digit"]["pool"], at["chain_sum/2-digit"]["selected"]) == (2, 2)
    assert at["chain_sum/2-digit"]["share_of_value_selected"] == 1.0
    assert at["products/2-digit"]["share_of_subset"] == pytest.approx(4 / 8)  # shares over the whole subset
    assert sum(v["selected"] for v in at.values()) == 7 and sum(v["pool"] for v in at.values()) == 18


def test_no_answer_type_table_without_answer_types():
    o = subset_overlap([rec("a", None), rec("b", None)], [rec("a", None)])
    assert set(o) == {"task", "source"}
    assert composition_table(o, "answer_type") == []


def test_composition_table():
    lines = composition_table(subset_overlap(POOL, CHOSEN), "answer_type")
    assert lines[0] == "| answer type | pool | pool share | selected | subset share |"
    assert "| chain_sum/2-digit | 2 | 10% | 2 | 25% |" in lines and len(lines) == 2 + 3
