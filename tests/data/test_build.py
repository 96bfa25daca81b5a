"""`dualsft data build`: real reasoning-gym splits, disjoint and seeded, and a scorer for every task."""

from __future__ import annotations

import json

import pytest

from dualsft.cli import main as cli_main
from dualsft.data.build import DataBuildConfig, build_data, build_splits, generate_task_items, pool_counts, split_seed
from dualsft.data.formats import load_examples
from dualsft.data.tasks import TASKS, extract_answer, score_answer
from dualsft.errors import ConfigError, MetadataMismatchError
from dualsft.io import read_json, read_jsonl

SMALL = dict(pool_size=40, val_size=6, test_size=8, stability_size=3, humaneval_size=2, target_share=0.25)


def questions(rows: list[dict]) -> set[str]:
    return {r.get("question") or r["prompt"] for r in rows}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    d = build_data(DataBuildConfig(run_dir=str(run), **SMALL))
    return d


def test_files_counts_and_schema(built):
    for name in ("pool.jsonl", "val.jsonl", "test.jsonl", "stability.jsonl", "metadata.json", "datacard.md"):
        assert (built / name).exists(), name
    pool, val, test = (read_jsonl(built / f"{s}.jsonl") for s in ("pool", "val", "test"))
    assert len(pool) == 40 and len(val) == 6 and len(test) == 8
    assert sum(r["task"] == "chain_sum" for r in pool) == 10  # target_share 0.25: a minority of 40
    assert {r["task"] for r in val} == {"chain_sum"} == {r["task"] for r in test}
    assert len({r["task"] for r in pool}) == len(DataBuildConfig().pool_tasks.split(","))
    for r in pool + val + test:
        assert r["source"] == "reasoning_gym" and set(r["rg"]) == {"dataset", "config", "seed", "idx", "metadata"}
    stab = read_jsonl(built / "stability.jsonl")
    assert "chain_sum" not in {r["task"] for r in stab}
    he = [r for r in stab if r["task"] == "humaneval"]
    assert len(he) == 2 and all(set(r["humaneval"]) == {"task_id", "entry_point", "test"} for r in he)
    # every file reads through the common loader, with its own distinct indices
    for s in ("pool", "val", "test", "stability"):
        exs = load_examples(built / f"{s}.jsonl")
        assert [e.index for e in exs] == list(range(len(exs)))
    meta = read_json(built / "metadata.json")
    assert meta["generators"]["reasoning_gym"] == "0.1.25" and set(meta["data"]) == {"pool", "val", "test", "stability"}
    assert meta["seeds"]["test"]["chain_sum"] == test[0]["rg"]["seed"] and meta["counts"]["pool"]["chain_sum"] == 10
    assert "| chain_sum | 8 | 6 | 10 | 0 |" in (built / "datacard.md").read_text()


def test_splits_disjoint_by_question_text(built):
    rows = {s: read_jsonl(built / f"{s}.jsonl") for s in ("pool", "val", "test", "stability")}
    assert not questions(rows["test"]) & (questions(rows["val"]) | questions(rows["pool"]) | questions(rows["stability"]))
    assert not questions(rows["val"]) & questions(rows["pool"])
    assert not questions(rows["pool"]) & questions(rows["stability"])
    seeds = {(r["task"], r["rg"]["seed"]) for s in ("pool", "val", "test") for r in rows[s]}
    assert len({s for _, s in seeds}) == len(seeds)  # one generator seed per (split, task)


def test_seeded_and_reproducible(built, tmp_path):
    again = build_splits(DataBuildConfig(**SMALL))
    assert again["pool"] == read_jsonl(built / "pool.jsonl")
    other = build_splits(DataBuildConfig(**{**SMALL, "seed": 1}))
    assert questions(other["test"]) != questions(again["test"])
    assert split_seed(0, "test", "chain_sum") != split_seed(0, "val", "chain_sum")


def test_reuse_and_mismatch(tmp_path):
    cfg = DataBuildConfig(run_dir=str(tmp_path), **{**SMALL, "humaneval_size": 0})
    build_data(cfg)
    build_data(cfg)  # same settings: the folder is reused
    with pytest.raises(MetadataMismatchError, match="pool_size"):
        build_data(DataBuildConfig(run_dir=str(tmp_path), **{**SMALL, "humaneval_size": 0, "pool_size": 30}))
    build_data(DataBuildConfig(run_dir=str(tmp_path), overwrite=True, **{**SMALL, "humaneval_size": 0, "pool_size": 30}))
    assert len(read_jsonl(tmp_path / "data" / "pool.jsonl")) == 30


def test_cli_and_errors(tmp_path):
    out = tmp_path / "d"
    assert cli_main(["data", "build", "--out", str(out), "--pool-size", "12", "--val-size", "2", "--test-size", "3",
                     "--stability-size", "1", "--humaneval-size", "1", "--target-task", "gcd",
                     "--pool-tasks", "gcd,leg_counting"]) == 0
    assert {r["task"] for r in read_jsonl(out / "test.jsonl")} == {"gcd"}
    assert {r["task"] for r in read_jsonl(out / "stability.jsonl")} == {"leg_counting", "humaneval"}
    assert cli_main(["data", "build", "--out", str(tmp_path / "e"), "--target-task", "nope"]) == 2
    with pytest.raises(ConfigError, match="distinct"):
        generate_task_items("count_bits", 300, 1, set())  # only 255 distinct questions exist
    assert pool_counts(["a", "b", "c"], "a", 10, 0.2) == {"a": 2, "b": 4, "c": 4}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_score_answer_every_task(task):
    rec = json.loads(json.dumps(generate_task_items(task, 1, split_seed(0, "unit", task), set())[0]))
    ans = rec["answer"]
    assert score_answer(rec, ans) == 1.0
    assert score_answer(rec, f"  {ans}<|im_end|>\n", ("<|im_end|>",)) == 1.0  # whitespace / EOS stripped
    assert score_answer(rec, f"{ans}.\nmore text") == 1.0  # first line, one trailing period
    assert score_answer(rec, "#" * max(3, len(ans))) == 0.0
    assert score_answer(rec, f"The answer is {ans}") < 1.0  # strict: answer only


def test_extract_answer_and_plain_records():
    assert extract_answer("<answer> 42 </answer> because") == "42"
    assert extract_answer("\n\n 7.\n8") == "7"
    assert extract_answer("") == ""
    assert score_answer({"prompt": "p", "completion": "yes"}, "yes\n") == 1.0
    assert score_answer({"prompt": "p", "completion": "yes"}, "no") == 0.0
