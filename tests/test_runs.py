"""Run folders: metadata written atomically, reused when equal, refused (naming the field) when not."""

from __future__ import annotations

import json

import pytest

from dualsft.config import CommonConfig
from dualsft.errors import ArtifactError, MetadataMismatchError
from dualsft.io import atomic_write_text, iter_jsonl, load_tensors, save_tensors
from dualsft.runs import build_metadata, file_fingerprint, first_difference, prepare_stage_dir, require_stage


def meta(tmp_path, **cfg):
    data = tmp_path / "pool.jsonl"
    if not data.exists():
        data.write_text('{"prompt": "a", "completion": "b"}\n')
    return build_metadata("scores", CommonConfig(**cfg), model_id="m", model_fingerprint="abc", data_files={"pool": data})


def test_metadata_has_versions_model_data_and_config(tmp_path):
    m = meta(tmp_path, seed=3)
    assert {"dualsft", "torch", "transformers"} <= set(m["versions"])
    assert m["model"] == {"id": "m", "fingerprint": "abc"}
    assert m["data"]["pool"]["fingerprint"] == file_fingerprint(tmp_path / "pool.jsonl")
    assert m["config"]["seed"] == 3


def test_same_metadata_reuses_folder_and_different_is_refused(tmp_path):
    run = tmp_path / "run"
    d = prepare_stage_dir(run, "scores", meta(tmp_path, seed=1))
    (d / "keep.txt").write_text("x")
    assert prepare_stage_dir(run, "scores", meta(tmp_path, seed=1)) == d and (d / "keep.txt").exists()
    with pytest.raises(MetadataMismatchError, match="'config.seed' is 1 there but 2 now") as ei:
        prepare_stage_dir(run, "scores", meta(tmp_path, seed=2))
    assert ei.value.field == "config.seed"
    prepare_stage_dir(run, "scores", meta(tmp_path, seed=2), overwrite=True)
    assert not (d / "keep.txt").exists()


def test_changed_data_file_is_a_metadata_difference(tmp_path):
    run = tmp_path / "run"
    prepare_stage_dir(run, "scores", meta(tmp_path))
    (tmp_path / "pool.jsonl").write_text('{"prompt": "a", "completion": "changed"}\n')
    with pytest.raises(MetadataMismatchError) as ei:
        prepare_stage_dir(run, "scores", meta(tmp_path))
    assert ei.value.field == "data.pool.fingerprint"


def test_first_difference_ignores_volatile_fields():
    assert first_difference({"created": 1, "versions": {"a": 1}, "x": {"y": 1}},
                            {"created": 2, "versions": {"a": 2}, "x": {"y": 1}}) is None
    assert first_difference({"x": {"y": 1}}, {"x": {"y": 2}}) == "x.y"


def test_an_option_added_later_matches_older_records_at_its_old_behaviour():
    """A record made before --loss-chunk existed equals a new one with --loss-chunk 0 (what it did), at any
    depth; any other value, or an unknown new key, is still a difference."""
    old = {"config": {"lr": 1.0, "train": {"epochs": 3}}}
    new = {"config": {"lr": 1.0, "loss_chunk": 0, "train": {"epochs": 3, "gradient_checkpointing": False}}}
    assert first_difference(old, new) is None
    assert first_difference(old, {"config": {"lr": 1.0, "loss_chunk": 512, "train": {"epochs": 3}}}) == "config.loss_chunk"
    assert first_difference(old, {"config": {"lr": 1.0, "other": 0, "train": {"epochs": 3}}}) == "config.other"


def test_scores_recorded_before_the_formula_options_match_the_papers_formula():
    """A scores record without data_score / data_params / target_gradient / precondition was made with the
    paper's formula: it matches a new record holding the paper's values, not today's defaults (LESS's form)."""
    from dualsft.config import PAPER_SCORE

    old = {"config": {"eta": 2e-5, "order": 2}}
    assert first_difference(old, {"config": {"eta": 2e-5, "order": 2, **PAPER_SCORE}}) is None
    lessform = {"precondition": "auto", "data_params": "linear", "data_score": "cosine", "target_gradient": "normalized"}
    assert first_difference(old, {"config": {"eta": 2e-5, "order": 2, **lessform}}) == "config.data_params"


def test_require_stage_says_which_command_to_run(tmp_path):
    with pytest.raises(ArtifactError, match="run `dualsft score` first"):
        require_stage(tmp_path, "scores")


def test_unwritable_output_folder_path_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ArtifactError, match="cannot create output folder"):
        prepare_stage_dir(tmp_path / "file", "scores", meta(tmp_path))


def test_atomic_write_leaves_no_temp_files_and_roundtrips(tmp_path):
    import torch

    atomic_write_text(tmp_path / "a.txt", "hello")
    save_tensors(tmp_path / "t.safetensors", {"w": torch.arange(6.0).view(2, 3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "t.safetensors"]
    assert load_tensors(tmp_path / "t.safetensors")["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    (tmp_path / "r.jsonl").write_text(json.dumps({"a": 1}) + "\n\n" + json.dumps({"b": 2}) + "\n")
    assert [ln for ln, _ in iter_jsonl(tmp_path / "r.jsonl")] == [1, 3]


def test_safetensors_bytes_do_not_depend_on_the_process(tmp_path):
    """safetensors orders metadata by a per-process hash seed; save_tensors sorts it, so the same tensors
    always give the same bytes (file fingerprints in metadata.json depend on that)."""
    import subprocess
    import sys

    code = ("import sys, torch; from dualsft.io import save_tensors; "
            "save_tensors(sys.argv[1], {'b': torch.ones(3), 'a': torch.zeros(2)}, "
            "metadata={'format': 'x', 'shapes': 'y', 'z': 'w', 'q': 'r'})")
    paths = [tmp_path / f"t{i}.safetensors" for i in range(4)]
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True)
    assert len({p.read_bytes() for p in paths}) == 1
    from safetensors import safe_open

    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == {"format": "x", "shapes": "y", "z": "w", "q": "r"}
