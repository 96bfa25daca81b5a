"""The bad-input matrix (issue 8, part 2): every case drives the real entry point (the CLI, as a user
would), and checks three things:
    1. a TYPED error (the exact class, recovered from the CLI's log record; exit code 2, one line);
    2. a message naming the culprit (file and line, example index, option and value, parameter name);
    3. no artifact claiming success in the failing stage's folder (only metadata.json may be there).
docs/errors.md is the user-facing table of these cases.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reliability_helpers import model_args, score_args, write_records

from dualsft.cli import main as cli
from dualsft.errors import (
    ArtifactError,
    BudgetError,
    ConfigError,
    DataFormatError,
    DualSFTError,
    EmptyResponseError,
    MetadataMismatchError,
    ModelLoadError,
    NonFiniteLossError,
    SelectionError,
)
from dualsft.io import read_jsonl, write_jsonl
from dualsft.selection.mask import save_mask
from dualsft.testing import byte_tokenizer, micro_llama, toy_records

Fail = Callable[[list[str]], DualSFTError]
LONG_PROMPT = "Please compute this sum with great care and show nothing but the number. " * 3  # > 64 tokens


def assert_no_success(stage_dir: Path) -> None:
    """The failing stage left nothing but (at most) its metadata.json and the progress/ of the passes it
    did (resume state, docs/errors.md "Resume"): no result, summary or temp file."""
    if stage_dir.exists():
        left = sorted(p.name for p in stage_dir.iterdir())
        assert set(left) <= {"metadata.json", "progress"}, f"{stage_dir} holds {left} after a failed run"
        if (stage_dir / "progress").exists():
            kept = sorted(p.name for p in (stage_dir / "progress").iterdir())
            assert all(n.endswith((".safetensors", ".json")) and not n.startswith(".") for n in kept), kept


# --------------------------------------------------------------------------------------------- data files


def test_malformed_json_line(fail: Fail, micro_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    pool = tmp_path / "pool.jsonl"
    lines = (data_dir / "pool.jsonl").read_text().splitlines()
    lines[2] = '{"instruction": "What is 1 + 1?", "response": '  # line 3: cut off
    pool.write_text("\n".join(lines) + "\n")
    err = fail(score_args(micro_model_dir, tmp_path / "run", data_dir, "--pool", str(pool)))
    assert type(err) is DataFormatError
    assert f"{pool}:3: malformed JSON" in str(err)
    assert_no_success(tmp_path / "run" / "scores")


def test_unknown_schema(fail: Fail, micro_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    pool = write_records(tmp_path / "pool.jsonl", [toy_records(1)[0], {"text": "hello", "label": 1}])
    err = fail(score_args(micro_model_dir, tmp_path / "run", data_dir, "--pool", str(pool)))
    assert type(err) is DataFormatError
    assert f"{pool}:2: unknown schema" in str(err) and "['label', 'text']" in str(err) and "Supported" in str(err)
    assert_no_success(tmp_path / "run" / "scores")


def test_missing_field(fail: Fail, micro_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    recs = toy_records(4)
    recs[3] = {"instruction": "What is 2 + 2?"}
    pool = write_records(tmp_path / "pool.jsonl", recs)
    err = fail(score_args(micro_model_dir, tmp_path / "run", data_dir, "--pool", str(pool)))
    assert type(err) is DataFormatError
    assert f"{pool}:4:" in str(err) and "field 'response' is missing" in str(err)
    assert_no_success(tmp_path / "run" / "scores")


@pytest.mark.parametrize("which", ["pool", "target"])
@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_pool_or_target(fail: Fail, micro_model_dir: Path, data_dir: Path, tmp_path: Path, which: str,
                              content: str) -> None:
    empty = tmp_path / f"{which}.jsonl"
    empty.write_text(content)
    err = fail(score_args(micro_model_dir, tmp_path / "run", data_dir, f"--{which}", str(empty)))
    assert type(err) is DataFormatError
    assert f"{empty}: no examples" in str(err)
    assert_no_success(tmp_path / "run" / "scores")


def test_example_with_no_response_token(fail: Fail, micro_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    recs = toy_records(6)
    recs[2] = {"instruction": LONG_PROMPT, "response": "4"}  # the prompt alone fills --max-length 64
    pool = write_records(tmp_path / "pool.jsonl", recs)
    err = fail(score_args(micro_model_dir, tmp_path / "run", data_dir, "--pool", str(pool)))
    assert type(err) is EmptyResponseError and err.indices == [2]
    assert "indices [2]" in str(err) and str(pool) in str(err) and "--max-length" in str(err)
    assert_no_success(tmp_path / "run" / "scores")
    # the documented way out: --drop-empty skips it and the stage succeeds without that example
    assert cli(score_args(micro_model_dir, tmp_path / "run2", data_dir, "--pool", str(pool), "--drop-empty")) == 0
    assert [r["index"] for r in read_jsonl(tmp_path / "run2" / "scores" / "data_scores.jsonl")] == [0, 1, 3, 4, 5]


def test_all_examples_truncated_away(fail: Fail, micro_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    pool = write_records(tmp_path / "pool.jsonl", [{"instruction": LONG_PROMPT + str(i), "response": "4"}
                                                   for i in range(3)])
    err = fail(score_args(micro_model_dir, tmp_path / "run", data_dir, "--pool", str(pool), "--drop-empty"))
    assert type(err) is EmptyResponseError and err.indices == [0, 1, 2]
    assert str(pool) in str(err) and "--max-length 64" in str(err) and "[0, 1, 2]" in str(err)
    assert_no_success(tmp_path / "run" / "scores")


def test_max_length_too_small(fail: Fail, micro_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    err = fail([*score_args(micro_model_dir, tmp_path / "run", data_dir), "--max-length", "1"])
    assert type(err) is DataFormatError and "--max-length must be at least 2, got 1" in str(err)
    assert_no_success(tmp_path / "run" / "scores")


# --------------------------------------------------------------------------------------------- options


def test_bad_template_flag_is_refused_by_the_parser(micro_model_dir: Path, data_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli([*score_args(micro_model_dir, tmp_path / "run", data_dir), "--template", "jinja"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--template" in err and "invalid choice: 'jinja'" in err
    assert not (tmp_path / "run").exists()


def test_bad_template_in_yaml(fail: Fail, micro_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "score.yaml"
    cfg.write_text("template: jinja\n")
    err = fail([*score_args(micro_model_dir, tmp_path / "run", data_dir), "--config", str(cfg)])
    assert type(err) is ConfigError
    assert "template" in str(err) and "'jinja'" in str(err) and "'chat'" in str(err) and str(cfg) in str(err)
    assert_no_success(tmp_path / "run" / "scores")


def test_template_chat_without_a_chat_template(fail: Fail, data_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    micro_llama().save_pretrained(model_dir)
    tok = byte_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(model_dir)
    err = fail(score_args(model_dir, tmp_path / "run", data_dir))
    assert type(err) is DataFormatError and "--template chat" in str(err) and "--template plain" in str(err)
    assert_no_success(tmp_path / "run" / "scores")


def test_unknown_option_in_config_yaml(fail: Fail, micro_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "score.yaml"
    cfg.write_text("eta: 0.01\nmax_lenght: 64\n")  # typo
    err = fail([*score_args(micro_model_dir, tmp_path / "run", data_dir), "--config", str(cfg)])
    assert type(err) is ConfigError
    assert "max_lenght" in str(err) and str(cfg) in str(err) and "max_length" in str(err)
    assert_no_success(tmp_path / "run" / "scores")


def test_bad_value_type_in_config_yaml(fail: Fail, micro_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "score.yaml"
    cfg.write_text("eta: small\n")
    err = fail([*score_args(micro_model_dir, tmp_path / "run", data_dir), "--config", str(cfg)])
    assert type(err) is ConfigError and "eta" in str(err) and "'small'" in str(err) and "a number" in str(err)
    assert_no_success(tmp_path / "run" / "scores")


@pytest.mark.parametrize("text, needles", [
    ("score:\n  model: other\n", ["score.model", "set it at the top level"]),
    ("train:\n  lr: -1\n", ["--lr -1", "must be positive"]),
])
def test_run_section_values_are_checked_before_any_stage(fail: Fail, micro_model_dir: Path, tmp_path: Path,
                                                           text: str, needles: list[str]) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    err = fail(["run", "--model", str(micro_model_dir), "--run-dir", str(tmp_path / "run"), "--config", str(cfg)])
    assert type(err) is ConfigError and all(n in str(err) for n in needles), str(err)
    assert not (tmp_path / "run").exists()


def test_warmup_batch_not_a_multiple_of_micro_batch(fail: Fail, micro_model_dir: Path, data_dir: Path,
                                                    tmp_path: Path) -> None:
    err = fail(["warmup", *model_args(micro_model_dir, tmp_path / "run"), "--pool", str(data_dir / "pool.jsonl"),
                "--batch-size", "3", "--micro-batch-size", "2"])
    assert type(err) is ConfigError and "--batch-size (3)" in str(err) and "--micro-batch-size (2)" in str(err)
    assert_no_success(tmp_path / "run" / "warmup")


@pytest.mark.parametrize("flag", ["--target-task", "--pool-tasks", "--stability-tasks"])
def test_data_build_unknown_task(fail: Fail, tmp_path: Path, flag: str) -> None:
    value = "chain_sum,no_such_task" if flag == "--pool-tasks" else "no_such_task"
    err = fail(["data", "build", "--run-dir", str(tmp_path / "run"), flag, value])
    assert type(err) is ConfigError and f"{flag}: unknown task 'no_such_task'" in str(err) and "chain_sum" in str(err)
    assert_no_success(tmp_path / "run" / "data")
    assert not (tmp_path / "run" / "data").exists()


# --------------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("flags, err_type, needles", [
    (["--data-budget", "0"], BudgetError, ["--data-budget 0.0", "fraction in (0, 1]"]),
    (["--data-budget", "1.5"], BudgetError, ["--data-budget 1.5", "whole number"]),
    (["--data-budget", "25"], BudgetError, ["--data-budget 25 exceeds the 10 pool examples"]),
    (["--data-budget", "0.01"], BudgetError, ["--data-budget 0.01 of 10 pool examples rounds to 0"]),
    (["--param-budget", "0"], BudgetError, ["--param-budget 0.0", "trainable entries"]),
    (["--param-budget", "1e12"], BudgetError, ["--param-budget 1000000000000 exceeds"]),
    (["--quota-layer", "0.8", "--quota-module", "0.4"], BudgetError, ["--quota-layer 0.8 + --quota-module 0.4"]),
    (["--quota-layer", "-0.1"], BudgetError, ["--quota-layer -0.1"]),
    (["--include", "nothing_like_this"], SelectionError, ["--include 'nothing_like_this' matches no parameter"]),
    (["--exclude", "."], SelectionError, ["leave no parameter"]),
    (["--include", "mlp", "--param-budget", "0.9"], BudgetError, ["--param-budget 0.9", "--include/--exclude"]),
    (["--include", "(["], SelectionError, ["--include '([' is not a valid regular expression"]),
    (["--granularity", "block:0x3"], ConfigError, ["--granularity 'block:0x3'"]),
])
def test_select_budget_and_filter_errors(fail: Fail, run_copy: Path, flags: list[str], err_type: type,
                                         needles: list[str]) -> None:
    err = fail(["select", "--run-dir", str(run_copy), *flags])
    assert type(err) is err_type, repr(err)
    for n in needles:
        assert n in str(err), (n, str(err))
    assert_no_success(run_copy / "selection")


def test_non_finite_data_scores_are_refused(fail: Fail, run_copy: Path) -> None:
    path = run_copy / "scores" / "data_scores.jsonl"
    rows = read_jsonl(path)
    rows[4]["score"] = float("nan")
    write_jsonl(path, rows)
    err = fail(["select", "--run-dir", str(run_copy)])
    assert type(err) is SelectionError and "NaN/inf" in str(err) and "φ_data" in str(err)
    assert not (run_copy / "selection" / "subset.jsonl").exists()
    assert not (run_copy / "selection" / "summary.json").exists()


# --------------------------------------------------------------------------------------------- NaN / inf


HASH_AT = (3, 7)


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A micro Llama (untied) whose embedding row of '#' is NaN, and a pool where only examples 3 and 7
    contain '#': exactly those two have a NaN loss (rows of a batch do not mix)."""
    d = tmp_path_factory.mktemp("nan")
    model = micro_llama(tied=False)
    tok = byte_tokenizer()
    (hash_id,) = tok("#", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.model.embed_tokens.weight[hash_id] = float("nan")
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    recs = toy_records(10)
    for i in HASH_AT:
        recs[i] = {**recs[i], "instruction": recs[i]["instruction"] + " #"}
    write_records(d / "pool.jsonl", recs)
    return d / "model", d / "pool.jsonl"


@pytest.mark.parametrize("method", ["ghost", "jvp"])
def test_nan_loss_in_scoring_names_the_examples(fail: Fail, nan_model: tuple[Path, Path], data_dir: Path,
                                                tmp_path: Path, method: str) -> None:
    model_dir, pool = nan_model
    rank = ["--data-score", "inner"] if method == "jvp" else []  # jvp has no per-example norms for the cosine
    err = fail(score_args(model_dir, tmp_path / "run", data_dir, "--pool", str(pool), "--batch-size", "16",
                          "--method", method, *rank))
    assert type(err) is NonFiniteLossError and sorted(err.indices) == list(HASH_AT)
    assert all(str(i) in str(err) for i in HASH_AT)
    assert_no_success(tmp_path / "run" / "scores")


def test_nan_loss_in_warmup_names_the_examples(fail: Fail, nan_model: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, pool = nan_model
    err = fail(["warmup", *model_args(model_dir, tmp_path / "run"), "--pool", str(pool), "--warmup-ratio", "1",
                "--batch-size", "16", "--micro-batch-size", "16"])
    assert type(err) is NonFiniteLossError and sorted(err.indices) == list(HASH_AT)
    w = tmp_path / "run" / "warmup"
    assert not (w / "summary.json").exists() and not (w / "exp_avg_sq.safetensors").exists()
    assert not (w / "model").exists()


@pytest.mark.parametrize("method", ["sparse", "full"])
def test_nan_loss_in_training_names_the_examples(fail: Fail, nan_model: tuple[Path, Path], tmp_path: Path,
                                                 method: str) -> None:
    model_dir, pool = nan_model
    extra = ["--mask", "none"]
    if method == "sparse":
        shapes = {n: tuple(p.shape) for n, p in micro_llama(tied=False).named_parameters()}
        mask = {n: torch.arange(0, min(s[0], 5), dtype=torch.int32) for n, s in shapes.items()}
        save_mask(tmp_path / "mask.safetensors", mask, shapes)
        extra = ["--mask", str(tmp_path / "mask.safetensors")]
    err = fail(["train", *model_args(model_dir, tmp_path / "run"), "--train-file", str(pool), *extra,
                "--batch-size", "16", "--micro-batch-size", "16", "--no-progress", "--attn-implementation", "eager"])
    assert type(err) is NonFiniteLossError and sorted(err.indices) == list(HASH_AT)
    assert all(str(i) in str(err) for i in HASH_AT)
    assert_no_success(tmp_path / "run" / "train")


def test_training_that_diverges_stops_and_names_the_step_and_examples(fail: Fail, micro_model_dir: Path,
                                                                     data_dir: Path, tmp_path: Path) -> None:
    """Finite data, absurd --lr without clipping: step 1 blows the weights up, step 2 is refused."""
    err = fail(["train", *model_args(micro_model_dir, tmp_path / "run"), "--train-file", str(data_dir / "pool.jsonl"),
                "--mask", "none", "--batch-size", "4", "--micro-batch-size", "4", "--lr", "1e30", "--max-grad-norm", "0",
                "--max-steps", "3", "--no-progress", "--attn-implementation", "eager"])
    assert type(err) is NonFiniteLossError and len(err.indices) == 4 and set(err.indices) <= set(range(10))
    assert "step 2" in str(err) and "--lr" in str(err)
    assert_no_success(tmp_path / "run" / "train")


# --------------------------------------------------------------------------------------------- models, artifacts


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture as micro_model_dir, other weights (seed 1)."""
    d = tmp_path_factory.mktemp("other")
    micro_llama(seed=1).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def test_scores_from_another_model(fail: Fail, run_copy: Path, other_model_dir: Path) -> None:
    err = fail(["select", "--run-dir", str(run_copy), "--model", str(other_model_dir)])
    assert type(err) is MetadataMismatchError and err.field == "model.fingerprint"
    assert "RUN/scores" in str(err) and "rerun" in str(err)
    assert_no_success(run_copy / "selection")


def test_mask_for_another_architecture(fail: Fail, micro_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    big = micro_llama(vocab_size=300)
    shapes = {n: tuple(p.shape) for n, p in big.named_parameters()}
    mask_file = tmp_path / "mask.safetensors"
    save_mask(mask_file, {"model.embed_tokens.weight": torch.tensor([1, 2], dtype=torch.int32)}, shapes)
    err = fail(["train", *model_args(micro_model_dir, tmp_path / "run"), "--train-file", str(data_dir / "pool.jsonl"),
                "--mask", str(mask_file), "--no-progress"])
    assert type(err) is ArtifactError
    assert "model.embed_tokens.weight" in str(err) and "(300, 32)" in str(err) and "(259, 32)" in str(err)
    assert str(mask_file) in str(err)
    assert_no_success(tmp_path / "run" / "train")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, micro_model_dir: Path, data_dir: Path) -> Path:
    """A finished `dualsft train` (full fine-tuning, one step) of micro_model_dir."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert cli(["train", *model_args(micro_model_dir, run), "--train-file", str(data_dir / "pool.jsonl"),
                "--mask", "none", "--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "4", "--lr", "1e-2",
                "--no-progress", "--attn-implementation", "eager"]) == 0
    return run


def test_delta_applied_to_the_wrong_base(fail: Fail, trained_run: Path, other_model_dir: Path,
                                         tmp_path: Path) -> None:
    out = tmp_path / "merged"
    err = fail(["merge", "--run-dir", str(trained_run), "--model", str(other_model_dir), "--out", str(out)])
    assert type(err) is MetadataMismatchError and err.field == "base_fingerprint"
    assert str(trained_run / "train") in str(err) and "same base model" in str(err)
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    # the library function refuses too, and leaves the model untouched
    from transformers import AutoModelForCausalLM

    from dualsft.training.delta import apply_delta

    other = AutoModelForCausalLM.from_pretrained(other_model_dir)
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(MetadataMismatchError, match="fingerprint"):
        apply_delta(other, trained_run / "train")
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())


def test_rerun_with_other_settings_in_the_same_run_folder(fail: Fail, run_copy: Path, micro_model_dir: Path,
                                                          data_dir: Path) -> None:
    scores = run_copy / "scores"
    before = {p.name: p.read_bytes() for p in scores.iterdir()}
    err = fail(score_args(micro_model_dir, run_copy, data_dir, "--eta", "0.5"))
    assert type(err) is MetadataMismatchError and err.field == "config.eta"
    assert "'config.eta'" in str(err) and "0.5" in str(err) and "--overwrite" in str(err)
    assert {p.name: p.read_bytes() for p in scores.iterdir()} == before  # the earlier result is untouched


def test_non_causal_lm_model(fail: Fail, data_dir: Path, tmp_path: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=259, d_model=16, d_ff=32, d_kv=8, num_layers=1,
                                        num_heads=2, decoder_start_token_id=0)).save_pretrained(t5)
    byte_tokenizer().save_pretrained(t5)
    err = fail(score_args(t5, tmp_path / "run", data_dir))
    assert type(err) is ModelLoadError and str(t5) in str(err) and "T5Config" in str(err)
    assert "not a causal language model" in str(err)
    assert_no_success(tmp_path / "run" / "scores")


def test_model_folder_that_does_not_exist(fail: Fail, data_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    err = fail(score_args(missing, tmp_path / "run", data_dir))
    assert type(err) is ModelLoadError and str(missing) in str(err)
    assert_no_success(tmp_path / "run" / "scores")


def test_unwritable_output_folder(fail: Fail, micro_model_dir: Path, data_dir: Path, tmp_path: Path,
                                  run_copy: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    err = fail(score_args(micro_model_dir, blocker / "run", data_dir))
    assert type(err) is ArtifactError and str(blocker / "run" / "scores") in str(err) and "writable" in str(err)
    err = fail(["select", "--run-dir", str(run_copy), "--out", str(blocker / "sel")])
    assert type(err) is ArtifactError and str(blocker / "sel") in str(err)
    assert blocker.read_text() == "not a folder"


def test_cli_logs_one_line_with_the_error_type(micro_model_dir: Path, data_dir: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """What the user sees: exit code 2 and ``ERROR ... DataFormatError: <file>:<line>: ...``, no traceback."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text("{not json}\n")
    with caplog.at_level(logging.INFO, logger="dualsft"):
        assert cli(score_args(micro_model_dir, tmp_path / "run", data_dir, "--pool", str(pool))) == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].getMessage().startswith(f"DataFormatError: {pool}:1: malformed JSON")
    assert errors[0].exc_info is None


# ------------------------------------------------------------------------------ dataset sources, chat turns


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DatasetDict (train/test) of toy records, written by save_to_disk."""
    datasets = pytest.importorskip("datasets")
    d = tmp_path_factory.mktemp("saved") / "toy"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(toy_records(6)),
                          "test": datasets.Dataset.from_list(toy_records(2, seed=1))}).save_to_disk(str(d))
    return d


def test_missing_dataset_split(fail: Fail, micro_model_dir: Path, data_dir: Path, saved_dataset: Path,
                               tmp_path: Path) -> None:
    err = fail(score_args(micro_model_dir, tmp_path / "run", data_dir, "--pool", f"{saved_dataset}@validation"))
    assert type(err) is DataFormatError
    assert "no split 'validation'; available splits: ['train', 'test']" in str(err)
    assert_no_success(tmp_path / "run" / "scores")


def test_missing_dataset_column(fail: Fail, micro_model_dir: Path, data_dir: Path, saved_dataset: Path,
                                tmp_path: Path) -> None:
    err = fail(score_args(micro_model_dir, tmp_path / "run", data_dir, "--target",
                          f"{saved_dataset}@test?prompt=instruction&response=solution"))
    assert type(err) is DataFormatError
    assert "column(s) ['solution'] not in the dataset; available columns: ['instruction', 'response']" in str(err)


def test_chat_turns_not_alternating(fail: Fail, micro_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}]}
    pool = write_records(tmp_path / "pool.jsonl", [toy_records(1)[0], bad])
    err = fail(score_args(micro_model_dir, tmp_path / "run", data_dir, "--pool", str(pool)))
    assert type(err) is DataFormatError
    assert f"{pool}:2: turns must be an optional system message, then user and assistant alternating" in str(err)


def test_all_assistant_turns_need_the_chat_template(fail: Fail, micro_model_dir: Path, data_dir: Path,
                                                    tmp_path: Path) -> None:
    err = fail(score_args(micro_model_dir, tmp_path / "run", data_dir, "--template", "plain",
                          "--assistant-turns", "all"))
    assert type(err) is ConfigError and "--assistant-turns 'all': needs --template chat" in str(err)


def test_jvp_with_the_default_cosine_ranking(fail: Fail, micro_model_dir: Path, data_dir: Path,
                                             tmp_path: Path) -> None:
    """The default ranking divides by ‖g_n‖, which --method jvp cannot compute: refused before any pass, with
    the fix (--data-score inner) in the message, rather than silently ranking by another score."""
    err = fail(score_args(micro_model_dir, tmp_path / "run", data_dir, "--method", "jvp"))
    assert type(err) is ConfigError and "--data-score 'cosine'" in str(err)
    assert "pass --data-score inner to score with jvp" in str(err)
    assert_no_success(tmp_path / "run" / "scores")
