"""Run folders: one sub-folder per stage, each with a metadata.json that later stages check.

RUN/
  data/ warmup/ scores/ selection/ train/ eval/ compare/   (one per stage)
  <stage>/metadata.json  {versions, model id + weight fingerprint, data fingerprints, resolved config}
A stage refuses to write into a folder whose metadata differs (naming the field) unless --overwrite.

Paths are recorded relative to the working directory the command ran in (``portable_path``), never as this
machine's absolute folders, so a run folder can be shared. Where a path option points (PATH_OPTIONS, and each
data file's "path") is not compared on reuse: the files' fingerprints are, so a run folder spelled another way
(or reached from another working directory) is still the same run.
"""

from __future__ import annotations

import copy
import hashlib
import os
import platform
import shutil
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from dualsft.config import PATH_OPTIONS, UNRECORDED_SCORE
from dualsft.errors import ArtifactError, MetadataMismatchError
from dualsft.io import read_json, write_json

# Fields that describe the environment or the moment, not the result: never compared.
VOLATILE = ("created", "versions", "host", "wall_time_s", "resumable")
# Options added after run folders existed, with the value that reproduces what those folders did: a record
# (stage metadata, checkpoint settings) that lacks one matches a new record holding exactly that value, at
# any nesting level, so adding an option never orphans older run folders or checkpoints.
# The scoring-formula options were added with the paper's values as their defaults (UNRECORDED_SCORE; the
# defaults are LESS's form since issue 13): a scores record without them was made with the paper's formula.
ADDED_OPTIONS: dict[str, Any] = {"gradient_checkpointing": False, "loss_chunk": 0, "sharding": "none",
                                 **UNRECORDED_SCORE}


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as written into an artifact: relative to the working directory (``../..`` if it lies outside
    it) so no machine's absolute folders are recorded; a relative path is kept as given."""
    p = os.fspath(path)
    return os.path.relpath(p) if os.path.isabs(p) else p


def portable_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict (sections nested) with every PATH_OPTIONS value made portable; eval's
    comma list of train folders is made portable piece by piece ('auto'/'none' are kept)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out[k] = portable_config(v)
        elif k in PATH_OPTIONS and isinstance(v, (str, Path)) and str(v):
            out[k] = ",".join(portable_path(p) for p in str(v).split(","))
        else:
            out[k] = str(v) if isinstance(v, Path) else v
    return out


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 (first 16 hex digits) of a file's bytes; of a folder's files, sorted by relative path."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for q in files:
        if p.is_dir():
            h.update(str(q.relative_to(p)).encode())
        with open(q, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of dualsft and the libraries whose numerics matter."""
    from importlib.metadata import version  # no import of transformers itself: that costs seconds

    from dualsft import __version__

    return {"dualsft": __version__, "torch": version("torch"), "transformers": version("transformers"),
            "python": platform.python_version()}


def build_metadata(stage: str, config: Any, model_id: str | None = None, model_fingerprint: str | None = None,
                   data_files: dict[str, str | os.PathLike] | None = None, extra: dict[str, Any] | None = None) -> dict:
    """The metadata.json content for a stage. ``config`` is the resolved stage config (dataclass or dict)."""
    from dualsft.data.sources import source_fingerprint  # a data source may be a dataset split, not a file

    cfg = asdict(config) if is_dataclass(config) else dict(config)
    return {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": versions(),
        "model": {"id": model_id, "fingerprint": model_fingerprint},
        "data": {k: {**source_fingerprint(v), "path": portable_path(v)} for k, v in (data_files or {}).items()},
        "config": portable_config(cfg),
        **(extra or {}),
    }


def first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    """Dotted name of the first field that differs between two JSON-like values (None if equal). A key of
    ADDED_OPTIONS missing from ``old`` counts as holding its listed value."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if not prefix and k in VOLATILE:
                continue
            if k not in old and k in ADDED_OPTIONS and new[k] == ADDED_OPTIONS[k]:
                continue
            d = first_difference(old.get(k), new.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if old == new else prefix.rstrip(".")


def prepare_stage_dir(run_dir: str | os.PathLike, stage: str, metadata: dict, overwrite: bool = False,
                      ignore: tuple[str, ...] = ()) -> Path:
    """Create RUN/<stage>, or check an existing one's metadata.

    Returns the stage folder. If it exists with metadata that differs (outside VOLATILE, the locations
    ``locations`` lists and ``ignore``, given as dotted names), raises MetadataMismatchError naming the
    field, unless ``overwrite`` (then the folder is cleared). Equal metadata keeps the folder and its
    metadata.json untouched (so a stage can resume, and later stages that fingerprint this metadata
    still match).
    """
    d = Path(run_dir) / stage
    meta_path = d / "metadata.json"
    same = False
    if meta_path.exists():
        old = read_json(meta_path)
        skip = (*ignore, *locations(old), *locations(metadata))
        diff = first_difference(_strip(old, skip), _strip(metadata, skip))
        if diff and not overwrite:
            raise MetadataMismatchError(
                f"{d} was made with different settings: field {diff!r} is {_get(old, diff)!r} there but "
                f"{_get(metadata, diff)!r} now; pass --overwrite to replace it or choose another --run-dir",
                diff,
            )
        if diff and overwrite:
            shutil.rmtree(d)
        same = diff is None
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create output folder {d}: {e.strerror}; choose a writable --run-dir") from e
    if not os.access(d, os.W_OK):
        raise ArtifactError(f"output folder {d} is not writable; choose a writable --run-dir")
    if not same:  # an equal folder keeps its metadata.json byte for byte (later stages fingerprint it)
        write_json(meta_path, metadata)
    return d


def locations(meta: dict) -> tuple[str, ...]:
    """Dotted names of the metadata's locations: config.<path option> and data.<file>.path (not compared)."""
    files = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    return (*(f"config.{k}" for k in PATH_OPTIONS), *(f"data.{k}.path" for k in files))


def require_stage(run_dir: str | os.PathLike, stage: str, files: tuple[str, ...] = ()) -> dict:
    """Metadata of an earlier stage's folder; raises ArtifactError if it or any of ``files`` is missing."""
    d = Path(run_dir) / stage
    if not (d / "metadata.json").exists():
        raise ArtifactError(f"{d} has no metadata.json: run `dualsft {stage_command(stage)}` first")
    for f in files:
        if not (d / f).exists():
            raise ArtifactError(f"{d / f} is missing: the {stage} stage did not finish; rerun it")
    return read_json(d / "metadata.json")


def check_same_model(meta: dict, model_fingerprint: str, what: str) -> None:
    """Refuse an artifact made for other weights (e.g. scores from another model)."""
    fp = (meta.get("model") or {}).get("fingerprint")
    if fp and fp != model_fingerprint:
        raise MetadataMismatchError(
            f"{what} was made for model weights with fingerprint {fp}, but the model now has {model_fingerprint}; "
            "rerun that stage for this model", "model.fingerprint")


def stage_command(stage: str) -> str:
    return {"scores": "score", "selection": "select", "warmup": "warmup", "train": "train", "eval": "eval",
            "data": "data build"}.get(stage, stage)


def _strip(meta: dict, ignore: tuple[str, ...]) -> dict:
    out = copy.deepcopy(meta)
    for dotted in ignore:
        parts = dotted.split(".")
        node = out
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return out


def _get(meta: dict, dotted: str) -> Any:
    node: Any = meta
    for p in dotted.split("."):
        node = node.get(p) if isinstance(node, dict) else None
    return node
