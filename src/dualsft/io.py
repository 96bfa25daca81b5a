"""Atomic file writes and JSON/JSONL helpers. No pickle anywhere: tensors go to safetensors."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dualsft.errors import ArtifactError, DataFormatError


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` through a temp file and rename, so readers never see half a file."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Atomically write one JSON object per line."""
    text = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in rows)
    atomic_write_text(path, text)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file raises ArtifactError naming it."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"missing artifact {path}: run the stage that writes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e})") from e


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line; malformed lines raise with file:line."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from e
            if not isinstance(obj, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read every object of a JSONL file (see iter_jsonl for errors)."""
    return [obj for _, obj in iter_jsonl(path)]


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically save a name->tensor dict as safetensors (contiguous CPU copies)."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        _sort_header_metadata(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sort_header_metadata(path: str) -> None:
    """Rewrite the safetensors header in place with ``__metadata__`` keys sorted.

    safetensors writes its metadata from a Rust HashMap, whose order changes from process to process, so
    the same tensors would give different file bytes (and file fingerprints). Sorting keeps the header's
    length, so only the header bytes are rewritten; the format allows trailing spaces as padding.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # cannot happen for a pure reordering; never corrupt a file to be tidy
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing file raises ArtifactError naming it."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"missing artifact {path}: run the stage that writes it first")
    return load_file(str(path), device=str(device))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
