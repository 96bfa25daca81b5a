"""The trained result as a small sparse delta, and how to apply it to the base model θ0.

``delta.safetensors`` (format ``dualsft-delta-v1``) holds, per changed parameter ``name`` (as in
``model.named_parameters()``, tied weights once):
    ``name::indices``  [k] int32 (int64 for tensors of ≥ 2**31 entries) sorted flat indices into
                       ``param.view(-1)``; ABSENT for a dense entry (full fine-tuning: whole tensor);
    ``name::values``   [k] (or the parameter's full shape for a dense entry) the NEW weights θ at those
                       entries, in the training weight dtype — not θ − θ0, so merging is bit-exact
                       (θ0 + (θ − θ0) is not always θ in floating point). The change is
                       ``values − θ0.view(-1)[indices]``.
Safetensors metadata: ``format``, ``base_model`` (id or path), ``base_fingerprint``
(``dualsft.models.model_fingerprint`` of θ0) and ``shapes`` (JSON {name: shape}).
LoRA runs save a peft adapter folder ``adapter/`` instead; ``apply_delta`` handles both.

Public API: ``SparseDelta``, ``extract_delta``, ``save_delta``, ``load_delta``, ``apply_delta``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dualsft.errors import ArtifactError, MetadataMismatchError
from dualsft.io import load_tensors, read_json, save_tensors
from dualsft.selection.mask import compact_indices

DELTA_FORMAT = "dualsft-delta-v1"
DELTA_FILE = "delta.safetensors"
LORA_DIR = "adapter"


@dataclass
class SparseDelta:
    """Per parameter: sorted flat ``indices`` [k] (None = whole tensor) and new ``values``.

    Attributes:
        indices: {name: [k] int32/int64 sorted flat indices, or None for a dense entry}.
        values: {name: [k] new values, or the full tensor for a dense entry}.
        shapes: {name: full parameter shape}.
        base_model / base_fingerprint: identity of θ0 the delta applies to.
    """

    indices: dict[str, torch.Tensor | None]
    values: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    base_model: str = ""
    base_fingerprint: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def num_entries(self) -> int:
        """Total number of stored entries."""
        return sum(v.numel() for v in self.values.values())


def extract_delta(model: torch.nn.Module, indices: dict[str, torch.Tensor] | None,
                  trainable: list[str] | None = None, base_model: str = "", base_fingerprint: str = "") -> SparseDelta:
    """Read the trained values out of ``model``.

    Args:
        indices: {name: sorted flat indices} of the mask (sparse or dense-masked training); None for a
            dense delta of every name in ``trainable`` (full fine-tuning).
        trainable: names stored densely when ``indices`` is None.
    """
    params = dict(model.named_parameters())
    names = sorted(indices) if indices is not None else sorted(trainable or [])
    shapes = {n: tuple(params[n].shape) for n in names}
    if indices is None:
        return delta_from_values({n: params[n].detach() for n in names}, None, shapes, base_model, base_fingerprint)
    idx = {n: compact_indices(indices[n], params[n].numel()) for n in names}
    vals = {n: params[n].detach().reshape(-1).index_select(0, idx[n]) for n in names}
    return delta_from_values(vals, idx, shapes, base_model, base_fingerprint)


def delta_from_values(values: dict[str, torch.Tensor], indices: dict[str, torch.Tensor] | None,
                      shapes: dict[str, tuple[int, ...]], base_model: str = "", base_fingerprint: str = "") -> SparseDelta:
    """A delta from trained values already read out (``extract_delta``, or gathered from FSDP shards:
    ``TrainResult.values``): [k] values at the mask's sorted flat ``indices``, or whole tensors (``indices``
    None: dense entries), with the full ``shapes``. Names are those of ``values``, in sorted order."""
    names = sorted(values)
    idx = {n: None if indices is None else compact_indices(indices[n], math.prod(shapes[n])) for n in names}
    return SparseDelta(idx, {n: values[n].detach().cpu().clone() for n in names},
                       {n: tuple(shapes[n]) for n in names}, base_model, base_fingerprint)


def save_delta(path: str | os.PathLike, delta: SparseDelta) -> None:
    """Write ``delta.safetensors`` atomically (see the module docstring for the layout)."""
    tensors: dict[str, torch.Tensor] = {}
    for n, v in delta.values.items():
        tensors[f"{n}::values"] = v
        if delta.indices.get(n) is not None:
            tensors[f"{n}::indices"] = delta.indices[n]
    meta = {"format": DELTA_FORMAT, "base_model": delta.base_model, "base_fingerprint": delta.base_fingerprint,
            "shapes": json.dumps({k: list(v) for k, v in delta.shapes.items()}), **delta.extra}
    save_tensors(path, tensors, metadata=meta)


def load_delta(path: str | os.PathLike) -> SparseDelta:
    """Read a ``delta.safetensors`` (a run's train folder also works)."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / DELTA_FILE
    tensors = load_tensors(p)
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != DELTA_FORMAT:
        raise ArtifactError(f"{p} is not a dualsft delta (format {meta.get('format')!r})")
    shapes = {k: tuple(v) for k, v in json.loads(meta.pop("shapes")).items()}
    names = sorted({k.rsplit("::", 1)[0] for k in tensors})
    idx = {n: tensors.get(f"{n}::indices") for n in names}
    vals = {n: tensors[f"{n}::values"] for n in names}
    base, fp = meta.pop("base_model", ""), meta.pop("base_fingerprint", "")
    meta.pop("format")
    return SparseDelta(idx, vals, shapes, base, fp, meta)


def check_base(model: torch.nn.Module, fingerprint: str, what: str) -> None:
    """Refuse a base model whose weights differ from the θ0 the delta was trained from."""
    from dualsft.models import model_fingerprint

    if not fingerprint:
        raise ArtifactError(f"{what} records no base-model fingerprint; it cannot be checked or applied safely")
    have = model_fingerprint(model)
    if have != fingerprint:
        raise MetadataMismatchError(
            f"{what} was trained from base weights with fingerprint {fingerprint}, but this model has {have}; "
            "load the same base model (same id, revision and dtype) the training run used", "base_fingerprint")


def write_delta_(model: torch.nn.Module, delta: SparseDelta) -> None:
    """Write the delta's values into ``model`` in place, touching only the stored entries."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in delta.values.items():
            if n not in params or tuple(params[n].shape) != tuple(delta.shapes[n]):
                got = None if n not in params else tuple(params[n].shape)
                raise ArtifactError(f"delta entry {n!r} has shape {delta.shapes[n]}, the model's is {got}")
            p = params[n]
            idx = delta.indices.get(n)
            if idx is None:
                p.copy_(v.to(device=p.device, dtype=p.dtype))
            else:
                p.view(-1).index_put_((idx.to(device=p.device, dtype=torch.int64),), v.to(device=p.device, dtype=p.dtype))


def apply_delta(model: torch.nn.Module, delta_dir_or_file: str | os.PathLike, check: bool = True) -> torch.nn.Module:
    """Apply a trained delta (or a LoRA adapter run) to a loaded base model θ0, in place; returns the model.

    ``delta_dir_or_file`` is a ``delta.safetensors`` or a train folder holding one, or a train folder with
    a peft ``adapter/`` (LoRA: merged into the weights). Refuses (MetadataMismatchError) a base whose
    weight fingerprint differs from the recorded θ0 unless ``check=False``.
    """
    p = Path(delta_dir_or_file)
    if p.is_dir() and not (p / DELTA_FILE).exists() and (p / LORA_DIR / "adapter_config.json").exists():
        return _apply_lora(model, p, check)
    if not (p.is_file() or (p / DELTA_FILE).exists()):
        raise ArtifactError(f"{p} holds neither {DELTA_FILE} nor a LoRA {LORA_DIR}/ folder: run `dualsft train` first")
    delta = load_delta(p)
    if check:
        check_base(model, delta.base_fingerprint, str(p))
    write_delta_(model, delta)
    return model


def _apply_lora(model: torch.nn.Module, train_dir: Path, check: bool) -> torch.nn.Module:
    from peft import PeftModel

    if check:
        info = read_json(train_dir / "adapter.json")
        check_base(model, (info.get("base_model") or {}).get("fingerprint", ""), str(train_dir))
    peft_model = PeftModel.from_pretrained(model, str(train_dir / LORA_DIR))
    return peft_model.merge_and_unload()
