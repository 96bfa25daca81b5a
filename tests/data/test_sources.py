"""Data sources: saved `datasets` folders with a split, Hub datasets by name, column mapping, fingerprints."""

from __future__ import annotations

import json

import pytest

from dualsft.data.formats import load_examples
from dualsft.data.sources import parse_source, source_fingerprint
from dualsft.errors import ArtifactError, DataFormatError
from dualsft.runs import build_metadata, file_fingerprint, portable_path

datasets = pytest.importorskip("datasets")

TRAIN = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]
TEST = [{"question": "What is 9 + 1?", "answer": "10"}]
MATH = [{"problem": "2+2?", "solution": "4", "level": 1}, {"problem": "3+3?", "solution": "6", "level": 2}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DatasetDict with train/test splits written by save_to_disk."""
    d = tmp_path_factory.mktemp("ds") / "arith"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TRAIN),
                          "test": datasets.Dataset.from_list(TEST)}).save_to_disk(str(d))
    return d


@pytest.fixture(scope="module")
def saved_math(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds") / "math"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(MATH)}).save_to_disk(str(d))
    return d


def test_spellings_parse():
    s = parse_source("hf://owner/name:main@test?prompt=q&response=a")
    assert (s.kind, s.location, s.config, s.split, s.columns) == ("hub", "owner/name", "main", "test", ("q", "a"))
    s = parse_source("hf://owner/name")
    assert (s.kind, s.location, s.config, s.split, s.columns) == ("hub", "owner/name", None, None, None)
    with pytest.raises(DataFormatError, match="no dataset name"):
        parse_source("hf://@test")
    with pytest.raises(DataFormatError, match=r"\?prompt=COLUMN&response=COLUMN"):
        parse_source("hf://owner/name?prompt=q")


def test_saved_folder_reads_train_by_default_and_a_named_split(saved):
    assert [e.response for e in load_examples(saved)] == ["1", "2", "3"]
    test = load_examples(f"{saved}@test")
    assert [(e.index, e.prompt_text, e.response) for e in test] == [(0, "What is 9 + 1?", "10")]


def test_missing_split_lists_the_available_ones(saved):
    with pytest.raises(DataFormatError, match=r"no split 'validation'; available splits: \['train', 'test'\]"):
        load_examples(f"{saved}@validation")


def test_split_on_a_file_or_a_missing_path_is_refused(tmp_path):
    f = tmp_path / "pool.jsonl"
    f.write_text(json.dumps(TRAIN[0]) + "\n")
    with pytest.raises(DataFormatError, match="is a file, not a saved dataset folder"):
        load_examples(f"{f}@test")
    with pytest.raises(DataFormatError, match="does not exist"):
        load_examples(tmp_path / "nope@train")
    odd = tmp_path / "pool@v2.jsonl"  # a path that exists as written is a path
    odd.write_text(json.dumps(TRAIN[0]) + "\n")
    assert load_examples(odd)[0].response == "1"


def test_column_mapping_renames_to_prompt_completion(saved_math, tmp_path):
    ex = load_examples(f"{saved_math}?prompt=problem&response=solution")
    assert [(e.prompt_text, e.response) for e in ex] == [("2+2?", "4"), ("3+3?", "6")]
    assert ex[0].record == {"prompt": "2+2?", "completion": "4", "level": 1}  # read again without the mapping
    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in MATH))
    assert [e.response for e in load_examples(f"{f}?prompt=problem&response=solution")] == ["4", "6"]


def test_missing_column_lists_the_available_ones(saved_math, tmp_path):
    with pytest.raises(DataFormatError, match=r"column\(s\) \['answer'\] not in the dataset; available columns: "
                                              r"\['problem', 'solution', 'level'\]"):
        load_examples(f"{saved_math}?prompt=problem&response=answer")
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps(MATH[0]) + "\n" + json.dumps({"problem": "x"}) + "\n")
    with pytest.raises(DataFormatError, match=r"m\.jsonl:2: column\(s\) \['solution'\] missing; available columns: "
                                              r"\['problem'\]"):
        load_examples(f"{f}?prompt=problem&response=solution")


def test_hub_name_calls_load_dataset_with_name_config_split(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(TEST)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ex = load_examples("hf://openai/gsm8k:main@test")
    assert calls == [("openai/gsm8k", "main", "test")] and ex[0].response == "10"
    load_examples("hf://openai/gsm8k")
    assert calls[-1] == ("openai/gsm8k", None, "train")  # no split: train


def test_hub_loader_failure_is_a_data_format_error(monkeypatch):
    def broken(path, name=None, split=None, **kw):
        raise ValueError('Unknown split "dev". Should be one of [\'train\', \'test\'].')

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(DataFormatError, match=r"hf://owner/x@dev: datasets.load_dataset\('owner/x', None, "
                                              r"split='dev'\) failed: Unknown split"):
        load_examples("hf://owner/x@dev")


def test_hub_spelling_loads_a_local_data_folder_for_real(tmp_path, monkeypatch):
    """The real load_dataset on a script-free local folder (no network): the same code path as a Hub id."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "hubby"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEST))
    assert [e.response for e in load_examples(f"hf://{d}@test")] == ["10"]
    assert len(load_examples(f"hf://{d}")) == 3


def test_fingerprint_identifies_name_split_and_content(saved, tmp_path):
    train, test = source_fingerprint(f"{saved}@train"), source_fingerprint(f"{saved}@test")
    assert train["fingerprint"] != test["fingerprint"]
    assert test["source"]["name"] == saved.name and test["source"]["split"] == "test"  # a local folder: its name
    assert len(test["source"]["content_sha256"]) == 64
    other = tmp_path / "arith2"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TRAIN),
                          "test": datasets.Dataset.from_list([{**TEST[0], "answer": "11"}])}).save_to_disk(str(other))
    assert source_fingerprint(f"{other}@test")["source"]["content_sha256"] != test["source"]["content_sha256"]
    f = tmp_path / "pool.jsonl"
    f.write_text(json.dumps(TRAIN[0]) + "\n")
    assert source_fingerprint(f) == {"path": str(f), "fingerprint": file_fingerprint(f)}  # files as before
    meta = build_metadata("scores", {}, data_files={"pool": f"{saved}@test"})
    assert meta["data"]["pool"] == {**test, "path": portable_path(f"{saved}@test")}  # recorded relative to the cwd


def test_select_reads_the_scored_pool_source_again(saved):
    from dualsft.selection.select import scores_pool_path

    meta = build_metadata("scores", {}, data_files={"pool": f"{saved}@test"})
    assert scores_pool_path(meta, saved) == portable_path(f"{saved}@test")  # as recorded: relative to the cwd
    meta["data"]["pool"]["fingerprint"] = "0" * 16
    with pytest.raises(Exception, match="changed since scoring"):
        scores_pool_path(meta, saved)
    meta["data"]["pool"]["path"] = f"{saved}@gone"
    with pytest.raises(ArtifactError, match="cannot be read any more"):
        scores_pool_path(meta, saved)


def test_score_select_train_on_dataset_splits_with_every_assistant_turn(micro_model_dir, tmp_path):
    """The CLI end to end on a saved DatasetDict of multi-turn chats: score reads FOLDER@split and records the
    source; select reads the pool again from that spec; train reads the subset with every turn labelled."""
    from dualsft.cli import main as cli
    from dualsft.io import read_json, read_jsonl
    from dualsft.testing import one_torch_thread

    def conv(i: int) -> dict:
        return {"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)},
                             {"role": "user", "content": "and +2?"}, {"role": "assistant", "content": str(i + 3)}]}

    ds = tmp_path / "chats"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([conv(i) for i in range(6)]),
                          "test": datasets.Dataset.from_list([conv(9)])}).save_to_disk(str(ds))
    run = tmp_path / "run"
    common = ["--model", str(micro_model_dir), "--run-dir", str(run), "--max-length", "96", "--assistant-turns", "all"]
    with one_torch_thread():
        assert cli(["score", *common, "--pool", f"{ds}@train", "--target", f"{ds}@test", "--order", "1",
                    "--batch-size", "3"]) == 0
        assert cli(["select", "--run-dir", str(run), "--data-budget", "0.5", "--param-budget", "0.05"]) == 0
        assert cli(["train", *common, "--epochs", "1", "--batch-size", "3", "--no-progress"]) == 0
    meta = read_json(run / "scores" / "metadata.json")
    assert meta["data"]["pool"]["source"]["split"] == "train" and meta["data"]["target"]["source"]["split"] == "test"
    assert meta["config"]["assistant_turns"] == "all"
    assert read_json(run / "selection" / "metadata.json")["data"]["pool"] == meta["data"]["pool"]
    subset = read_jsonl(run / "selection" / "subset.jsonl")
    assert len(subset) == 3 and all(len(r["messages"]) == 4 for r in subset)
    assert read_json(run / "train" / "metadata.json")["config"]["assistant_turns"] == "all"
