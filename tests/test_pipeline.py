"""`dualsft run` and `dualsft compare` end to end on a micro model (real reasoning-gym data, tiny sizes)."""

from __future__ import annotations

import json
import os
import re

import pytest

from dualsft.cli import main as cli
from dualsft.io import read_jsonl
from dualsft.models import load_model
from dualsft.selection.mask import load_mask
from dualsft.testing import one_torch_thread

TINY = ["--data.pool-size", "30", "--data.val-size", "4", "--data.test-size", "4", "--data.stability-size", "2",
        "--data.humaneval-size", "0", "--max-length", "640", "--score.batch-size", "4", "--train.batch-size", "4",
        "--train.micro-batch-size", "4", "--train.epochs", "1", "--eval.max-examples", "2", "--eval.batch-size", "4",
        "--score.lambda-prior", "0.2", "--data.dev-size", "4"]
ONE_LR = ["--lr-grid", ""]  # compare's lr grid is tested once (test_compare_lr_grid_and_tasks); elsewhere train.lr
ABSOLUTE = re.compile(r"""(^|[\s"'(])/(work|root|tmp|home|Users)/""")  # this machine's folders


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.mark.slow
def test_run_writes_every_stage_and_a_report(tmp_path, micro_model_dir, capsys):
    run = tmp_path / "run"
    assert cli(["run", "--model", str(micro_model_dir), "--run-dir", str(run), *TINY]) == 0
    for f in ["data/pool.jsonl", "warmup/exp_avg_sq.safetensors", "scores/param_scores.safetensors",
              "selection/subset.jsonl", "selection/mask.safetensors", "train/delta.safetensors", "eval/metrics.json",
              "report.md", "data_score_hist.png", "timings.json"]:
        assert (run / f).exists(), f
    assert len(read_jsonl(run / "selection" / "subset.jsonl")) == 3  # 10% of 30
    report = (run / "report.md").read_text()
    assert "| target accuracy (exact match) |" in report and "Subset composition by pool task" in report
    assert "V (validation split, the scoring target): 4 examples" in report and "by answer type" in report
    assert f"report: {run / 'report.md'}" in capsys.readouterr().out
    # a rerun resumes: every stage finds its folder complete and the report is rewritten
    assert cli(["run", "--model", str(micro_model_dir), "--run-dir", str(run), *TINY]) == 0


@pytest.mark.slow
def test_commands_reuse_a_run_folders_settings_and_record_no_absolute_path(tmp_path, micro_model_dir, monkeypatch,
                                                                           caplog):
    """`dualsft run --data.target-task products --run-dir run`, then `dualsft compare --run-dir run` without the
    data, model or stage flags: compare takes run's recorded settings instead of stopping at a metadata mismatch
    (a flag still wins; one for a stage compare writes anew is accepted); a flag that differs from a stage that
    already ran is refused naming the field. No .md/.json written under the run folder names an absolute path."""
    monkeypatch.chdir(tmp_path)
    model = os.path.relpath(micro_model_dir, tmp_path)  # a model id is recorded as given: pass a relative one
    assert cli(["run", "--model", model, "--run-dir", "run", *TINY, "--data.target-task", "products"]) == 0
    def data_record():  # the data build rewrites its metadata (a new "created"); settings and fingerprints stay
        meta = json.loads((tmp_path / "run" / "data" / "metadata.json").read_text())
        return meta["config"], meta["data"]

    data_meta = data_record()
    caplog.clear()
    assert cli(["compare", "--run-dir", "run", "--methods", "dualsft,dualsft@paper,random", "--seeds", "0",
                "--score.batch-size", "2", *ONE_LR]) == 0
    assert "settings taken from the run folder run" in caplog.text and f"model={model!r}" in caplog.text
    assert "data.val_size=4" in caplog.text and "score.batch_size" not in caplog.text
    assert data_record() == data_meta  # run's data, reused as it was
    res = json.loads((tmp_path / "run" / "compare" / "results.json").read_text())
    assert (res["config"]["model"], res["config"]["data"]["val_size"], res["config"]["train"]["epochs"]) == (model, 4, 1)
    scores = json.loads((tmp_path / "run" / "compare" / "scoring" / "seed0" / "scores" / "metadata.json").read_text())
    assert scores["config"]["batch_size"] == 2  # the flag won over run's recorded 4 (a folder compare writes anew)
    # plain dualsft scores with the defaults (LESS's form; every seed has a warm-up, so auto is adam-step);
    # dualsft@paper with the paper's formula, in its own folder
    scoring = tmp_path / "run" / "compare" / "scoring"
    plain, paper = (json.loads((scoring / d / "scores" / "summary.json").read_text()) for d in ("seed0", "seed0@paper"))
    formula = ("precondition", "data_params", "data_score", "target_gradient")
    assert tuple(plain[k] for k in formula) == ("adam-step", "linear", "cosine", "normalized")
    assert tuple(paper[k] for k in formula) == ("none", "all", "inner", "mean")
    assert abs(paper["sum_data"] - paper["uTG"]) <= 1e-5 * abs(paper["uTG"])
    assert cli(["train", "--run-dir", "run"]) == 0 and "already holds a finished run" in caplog.text
    caplog.clear()
    assert cli(["compare", "--run-dir", "run", "--data.target-task", "gcd", "--methods", "dualsft", "--seeds", "0"]) == 2
    assert "MetadataMismatchError" in caplog.text and "'config.target_task'" in caplog.text and "--overwrite" in caplog.text
    assert cli(["select", "--run-dir", "run", "--param-budget", "0.05"]) == 2 and "'config.param_budget'" in caplog.text
    assert cli(["select", "--run-dir", "run", "--param-budget", "0.05", "--out", "selection-b"]) == 0
    written = [p for p in (tmp_path / "run").rglob("*") if p.suffix in (".md", ".json") and p.is_file()]
    assert len(written) > 30
    for p in written:
        text = p.read_text()
        assert str(tmp_path) not in text and not ABSOLUTE.search(text), p


@pytest.mark.slow
def test_compare_matches_budgets_across_methods(tmp_path, micro_model_dir):
    run = tmp_path / "run"
    methods = "dualsft,dualsft-data,random,sift->less,loss+magnitude"
    assert cli(["compare", "--model", str(micro_model_dir), "--run-dir", str(run), *TINY, "--methods", methods,
                "--seeds", "0,1", "--less-dim", "64", *ONE_LR]) == 0
    out = run / "compare"
    d = sum(p.numel() for p in load_model(str(micro_model_dir)).parameters())  # tied embedding counted once
    k = int(0.1 * d + 0.5)
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == set(methods.split(","))
    for name, r in res["methods"].items():
        assert [s["seed"] for s in r["seeds"]] == [0, 1]
        assert r["summary"]["target acc"]["n"] == 2
        for seed in (0, 1):
            sel = out / name.replace("->", "-to-").replace("+", "_plus_") / f"seed{seed}" / "selection"
            assert len(read_jsonl(sel / "subset.jsonl")) == 3, name
            if r["param"] != "full":
                idx, _ = load_mask(sel / "mask.safetensors")
                assert sum(v.numel() for v in idx.values()) == k, name
            else:
                assert not (sel / "mask.safetensors").exists()
    # the random method's selections differ between seeds; DualSFT's warm-up subset and anchors do too
    rnd = [read_jsonl(out / "random" / f"seed{s}" / "selection" / "subset.jsonl") for s in (0, 1)]
    assert [r["index"] for r in rnd[0]] != [r["index"] for r in rnd[1]]
    warm = [json.loads((out / "scoring" / f"seed{s}" / "warmup" / "warmup_indices.json").read_text())["indices"]
            for s in (0, 1)]
    assert warm[0] != warm[1]
    # every cell has a 95% CI over seeds × test items, and every baseline a paired difference against dualsft
    for name, r in res["methods"].items():
        ci = r["ci"]["target acc"]
        assert ci["low"] <= ci["mean"] <= ci["high"] and ci["n_seeds"] == 2 and ci["n_examples"] == 2
        if name != "dualsft":
            assert r["vs_reference"]["target loss"]["verdict"] in ("win", "tie", "loss")
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in methods.split(","))
    assert (out / "tradeoff.png").exists() and (out / "scores.png").exists()


@pytest.mark.slow
def test_compare_rerun_reproduces_its_table(tmp_path, micro_model_dir):
    """Two fresh runs of the same compare command (separate run folders: data, warm-up, scores, selection,
    training and evaluation all redone) give the same per-seed metrics and the same markdown table cells."""
    methods = "dualsft,less->sift,random"
    res = []
    for name in ("a", "b"):
        run = tmp_path / name
        assert cli(["compare", "--model", str(micro_model_dir), "--run-dir", str(run), *TINY, "--methods", methods,
                    "--seeds", "0", "--less-dim", "64", *ONE_LR]) == 0
        res.append(json.loads((run / "compare" / "results.json").read_text()))
    assert res[0]["base"] == res[1]["base"]
    for m in methods.split(","):
        first, second = ([s["metrics"] for s in r["methods"][m]["seeds"]] for r in res)
        assert first == second, m  # CPU training and evaluation are deterministic: equal, not just close


@pytest.mark.slow
def test_compare_pairs_dualsft_with_a_baseline_axis(tmp_path, micro_model_dir):
    """DATA+PARAM with DualSFT on one axis takes the other axis from the baseline: dualsft+random trains
    DualSFT's subset under the random method's mask, random+dualsft the random subset under DualSFT's mask."""
    run = tmp_path / "run"
    methods = "dualsft,random,dualsft+random,random+dualsft,dualsft+lora"
    assert cli(["compare", "--model", str(micro_model_dir), "--run-dir", str(run), *TINY, "--methods", methods,
                "--seeds", "0", *ONE_LR]) == 0
    sel = {m: run / "compare" / m.replace("+", "_plus_") / "seed0" / "selection" for m in methods.split(",")}

    def subset(m):
        return [r["index"] for r in read_jsonl(sel[m] / "subset.jsonl")]

    def mask(m):
        return {n: t.tolist() for n, t in load_mask(sel[m] / "mask.safetensors")[0].items()}

    assert subset("dualsft+random") == subset("dualsft") != subset("random") == subset("random+dualsft")
    assert mask("dualsft+random") == mask("random") != mask("dualsft") == mask("random+dualsft")
    assert subset("dualsft+lora") == subset("dualsft") and not (sel["dualsft+lora"] / "mask.safetensors").exists()
    summary = json.loads((sel["dualsft+lora"] / "summary.json").read_text())
    assert summary["info"]["lora_rank"] >= 1
    # a mixed pair is the registry's selection (no `dualsft select` folder rewritten); compare keeps its cost apart
    assert summary["method"] == "dualsft+lora" and not (sel["dualsft+lora"] / "metadata.json").exists()
    assert "compare_cost" not in json.loads((sel["dualsft"] / "summary.json").read_text())
    assert all((sel[m].parent / "selection_cost.json").exists() for m in sel)


def test_compare_refuses_an_unknown_axis_before_any_work(tmp_path, micro_model_dir, caplog):
    assert cli(["compare", "--model", str(micro_model_dir), "--run-dir", str(tmp_path / "run"), *TINY,
                "--methods", "dualsft,dualsft+nope"]) == 2
    assert "DATA+PARAM takes" in caplog.text and "nope" in caplog.text
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compare_lr_grid_tasks_variants_and_test_split_last(tmp_path, micro_model_dir, monkeypatch):
    """Two target tasks in one command, an lr grid of two chosen on dev, a @noprior variant row; and an
    instrumented check that the test split is opened only after every training (grid and seeds) is done."""
    import builtins
    import io

    from dualsft.data import build
    from dualsft.training import train

    events: list[str] = []
    in_build = [False]
    real_open, real_train, real_build = builtins.open, train.main, build.main

    def spy_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("test.jsonl") and not any(c in mode for c in "wax") and not in_build[0]:
            events.append("read test")
        return real_open(file, mode, *args, **kwargs)

    def spy_train(cfg):
        events.append(f"train {cfg.out}")
        return real_train(cfg)

    def spy_build(cfg):  # the data build writes (and may re-read) the split it creates: not a test read
        in_build[0] = True
        try:
            return real_build(cfg)
        finally:
            in_build[0] = False

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(train, "main", spy_train)
    monkeypatch.setattr(build, "main", spy_build)
    run = tmp_path / "run"
    methods = "dualsft,dualsft@noprior,random"
    assert cli(["compare", "--model", str(micro_model_dir), "--run-dir", str(run), *TINY, "--methods", methods,
                "--seeds", "0,1", "--lr-grid", "1e-4,5e-4", "--target-tasks", "products,gcd"]) == 0
    for task in ("products", "gcd"):
        trains = [i for i, e in enumerate(events) if e.startswith("train") and f"/{task}/" in e]
        assert len(trains) == 3 * (2 + 1)  # per method: 2 grid lrs on seed 0, then seed 1 at the chosen lr
        res = json.loads((run / task / "compare" / "results.json").read_text())
        assert set(res["methods"]) == set(methods.split(","))
        for name, r in res["methods"].items():
            assert r["lr"] in (1e-4, 5e-4) and set(r["dev_loss"]) == {"0.0001", "0.0005"}, name
            assert [s["train"]["lr"] for s in r["seeds"]] == [r["lr"]] * 2
        assert (run / task / "compare" / "scoring" / "seed1@noprior" / "scores" / "summary.json").exists()
        table = (run / task / "compare" / "results.md").read_text()
        assert "| dualsft@noprior |" in table and "Paired differences" in table and "Subset composition" in table
        assert "issue 13's criterion" in table
        for name, c in res["target_check"].items():  # the criterion is read off the subsets and the evaluations
            subsets = [read_jsonl(run / task / "compare" / name / f"seed{s}" / "selection" /
                                  "subset.jsonl") for s in (0, 1)]
            assert c["target_share"] == [sum(x["task"] == task for x in sub) / len(sub) for sub in subsets], name
            pool = read_jsonl(run / task / "data" / "pool.jsonl")
            assert c["pool_share"] == sum(x["task"] == task for x in pool) / len(pool)
            assert c["share_2x_pool"] == all(x >= 2 * c["pool_share"] for x in c["target_share"])
            d = c["target_loss_minus_base"]
            assert d["low"] <= d["mean"] <= d["high"] and c["loss_below_base"] == (d["high"] < 0)
    # per task: every training precedes the first read of the test split
    first_read, last_train = events.index("read test"), max(i for i, e in enumerate(events) if e.startswith("train"))
    assert "read test" in events
    assert all(e.startswith("train") for e in events[:first_read] if e != "read test")
    products_trains = [i for i, e in enumerate(events) if e.startswith("train") and "/products/" in e]
    assert max(products_trains) < first_read < min(i for i, e in enumerate(events) if "/gcd/" in e) < last_train
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tasks"] == ["products", "gcd"] and summary["reference"] == "dualsft"
    assert sum(summary["wins_ties_losses"]["random"]["target loss"].values()) == 2
    assert set(summary["target_check"]) == {"products", "gcd"}
    assert "tasks passed" in (run / "summary.md").read_text()


def test_compare_variant_overrides_are_checked():
    from dualsft.errors import ConfigError
    from dualsft.evaluation.compare import VARIANTS, parse_method, variant_score
    from dualsft.scoring.score import ScoreConfig

    assert variant_score(ScoreConfig(lambda_prior=0.2), "noprior").lambda_prior == 0.0
    assert parse_method("dualsft@noprior") == parse_method("dualsft")
    with pytest.raises(ConfigError, match="unknown variant"):
        parse_method("dualsft@nope")
    with pytest.raises(ConfigError, match="uses none"):
        parse_method("random@noprior")
    VARIANTS["bogus"] = {"no_such_field": 1}
    try:
        with pytest.raises(ConfigError, match="no_such_field"):
            variant_score(ScoreConfig(), "bogus")
    finally:
        del VARIANTS["bogus"]


def test_compare_variants_set_the_whole_scoring_formula():
    """dualsft@paper is the paper's formula (= --preset release's score options); every variant sets all four
    formula options, so it means the same whatever the defaults; the one-change ablations are the paper's
    formula plus that change (as measured), lessform the defaults' LESS form."""
    from dualsft.config import PAPER_SCORE, PRESETS
    from dualsft.evaluation.compare import VARIANTS, variant_score
    from dualsft.scoring.score import ScoreConfig

    formula = ("precondition", "data_params", "data_score", "target_gradient")
    paper = variant_score(ScoreConfig(), "paper")
    assert tuple(getattr(paper, k) for k in formula) == ("none", "all", "inner", "mean")
    assert {k: PRESETS["release"]["score"][k] for k in formula} == PAPER_SCORE == VARIANTS["paper"]
    for name, overrides in VARIANTS.items():
        assert set(formula) <= set(overrides), name
    one_change = {"noprior": {"lambda_prior": 0.0}, "answer": {"score_tokens": "answer"},
                  "cosine": {"data_score": "cosine"}, "normalized": {"target_gradient": "normalized"},
                  "adam": {"precondition": "adam"}, "adamstep": {"precondition": "adam-step"},
                  "linear": {"data_params": "linear"}}
    for name, change in one_change.items():
        assert VARIANTS[name] == {**PAPER_SCORE, **change}, name
    assert VARIANTS["cosnorm"] == {**PAPER_SCORE, "data_score": "cosine", "target_gradient": "normalized"}
    less = variant_score(ScoreConfig(), "lessform")
    assert tuple(getattr(less, k) for k in formula) == ("adam-step", "linear", "cosine", "normalized")
    default = ScoreConfig()  # the defaults are lessform's, auto = adam-step wherever c exists
    assert tuple(getattr(default, k) for k in formula) == ("auto", *(getattr(less, k) for k in formula[1:]))
    assert variant_score(ScoreConfig(), "lessform-noadam").precondition == "none"


def test_run_sources_override_the_data_folder(tmp_path):
    from dualsft.config import build_config
    from dualsft.errors import ConfigError
    from dualsft.stages import RunConfig, builds_data, data_sources

    d = tmp_path / "data"
    d.mkdir()
    for name in ("pool", "val"):
        (d / f"{name}.jsonl").write_text("")
    cfg = build_config(RunConfig, {"data_dir": str(d), "test": "hf://owner/name:main@test"})
    assert data_sources(cfg) == {"pool": str(d / "pool.jsonl"), "val": str(d / "val.jsonl"),
                                 "test": "hf://owner/name:main@test"}
    assert not builds_data(cfg)
    with pytest.raises(ConfigError, match="lacks .*test.jsonl.*or --pool / --target / --test"):
        data_sources(build_config(RunConfig, {"data_dir": str(d)}))
    cfg = build_config(RunConfig, {"pool": "a@train", "target": "a@validation"})
    assert builds_data(cfg) and data_sources(cfg)["pool"] == "a@train"  # no test split given: the data is built
    assert not builds_data(build_config(RunConfig, {"pool": "a", "target": "b", "test": "c"}))


@pytest.mark.slow
def test_run_on_dataset_splits_builds_no_data(tmp_path, micro_model_dir):
    datasets = pytest.importorskip("datasets")
    from dualsft.testing import toy_records

    ds = tmp_path / "toy"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(toy_records(20)),
                          "validation": datasets.Dataset.from_list(toy_records(4, seed=1)),
                          "test": datasets.Dataset.from_list(toy_records(3, seed=2))}).save_to_disk(str(ds))
    run = tmp_path / "run"
    assert cli(["run", "--model", str(micro_model_dir), "--run-dir", str(run), "--pool", f"{ds}@train",
                "--target", f"{ds}@validation", "--test", f"{ds}@test", *TINY]) == 0
    assert not (run / "data").exists()
    meta = json.loads((run / "eval" / "metadata.json").read_text())
    assert meta["data"]["test"]["source"]["split"] == "test" and "stability" not in meta["data"]
    assert "V (validation split, the scoring target): 4 examples" in (run / "report.md").read_text()
