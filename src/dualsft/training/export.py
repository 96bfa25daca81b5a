"""`dualsft export`: a trained sparse delta as a peft adapter folder (docs/export.md).

    dualsft export --run-dir runs/demo --format shira              # RUN/train -> RUN/export-shira
    dualsft export --run-dir runs/demo --format shira --partial    # + dualsft_rest.safetensors for the rest

The folder loads with ``PeftModel.from_pretrained(base, DIR)`` (base = the training run's θ0) and holds:
    adapter_config.json, adapter_model.safetensors   peft's own save_pretrained (SHiRA)
    dualsft_rest.safetensors                         with --partial: the tensors SHiRA cannot hold, as a
                                                     dualsft delta (``apply_delta(base, DIR/dualsft_rest...)``)
    export.json                                      r, per-layer counts and padding, what was left out
    metadata.json                                    versions, base model, delta fingerprint, config
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from dualsft.config import opt
from dualsft.errors import ArtifactError, ExportError, MetadataMismatchError
from dualsft.io import read_json, write_json

if TYPE_CHECKING:  # the CLI imports every stage module at start-up: keep torch out of this one's import
    from dualsft.training.delta import SparseDelta
    from dualsft.training.shira import ShiraPlan

HELP = "export a trained sparse delta as a peft adapter (SHiRA) that PeftModel.from_pretrained loads"
log = logging.getLogger(__name__)
REST_FILE = "dualsft_rest.safetensors"
EXPORT_FORMAT = "dualsft-export-v1"


@dataclass(frozen=True)
class ExportConfig:
    """Options of `dualsft export`."""

    run_dir: str = opt("runs/default", "run folder (reads RUN/train, writes RUN/export-<format>)")
    train_dir: str | None = opt(None, "the training output folder; default RUN/train")
    format: Literal["shira"] = opt("shira", "adapter format: shira (peft's sparse high-rank adapter)")
    partial: bool = opt(False, "save the tensors the format cannot hold (embeddings, norms, tied head, ...) beside "
                               f"the adapter as {REST_FILE} instead of failing")
    model: str | None = opt(None, "base model id or folder; default: the one recorded in adapter.json")
    dtype: str | None = opt(None, "weight dtype; default: the dtype training used")
    out: str | None = opt(None, "output folder; default RUN/export-<format>")
    overwrite: bool = opt(False, "replace an existing output folder")


CONFIG = ExportConfig


def read_trained_delta(train_dir: Path) -> tuple[dict, SparseDelta]:
    """adapter.json and the SparseDelta of a finished sparse/full training run; typed errors otherwise."""
    from dualsft.training.delta import DELTA_FILE, LORA_DIR, load_delta

    info = read_json(train_dir / "adapter.json")
    if not info.get("complete"):
        raise ArtifactError(f"{train_dir} holds no finished training run: rerun `dualsft train`")
    if info.get("method") == "lora":
        raise ExportError(f"{train_dir} is a LoRA run: {train_dir / LORA_DIR} already is a peft adapter "
                          "(PeftModel.from_pretrained loads it); export converts sparse deltas")
    if not (train_dir / DELTA_FILE).exists():
        raise ArtifactError(f"{train_dir / DELTA_FILE} is missing: the training run did not finish; rerun it")
    delta = load_delta(train_dir / DELTA_FILE)
    recorded = (info.get("base_model") or {}).get("fingerprint", "")
    if recorded != delta.base_fingerprint:
        raise MetadataMismatchError(
            f"{train_dir}: adapter.json records base fingerprint {recorded!r} but {DELTA_FILE} was trained from "
            f"{delta.base_fingerprint!r}; the two files come from different runs: rerun `dualsft train`",
            "base_fingerprint")
    return info, delta


def export_record(plan: ShiraPlan, info: dict, cfg: ExportConfig, rest: bool) -> dict:
    """export.json: r, per-layer counts and padding, what was left out."""
    layers = {plan.layers[n]: {"parameter": n, "shape": list(plan.sizes[n]), "selected": plan.counts[n],
                               "entries": plan.entries(n), "padding": plan.entries(n) - plan.counts[n]}
              for n in plan.layers}
    selected = sum(v["selected"] for v in layers.values())
    entries = sum(v["entries"] for v in layers.values())
    return {"format": EXPORT_FORMAT, "peft_type": cfg.format.upper(), "r": plan.r,
            "base_model": info.get("base_model"), "weights_dtype": info.get("weights_dtype"),
            "totals": {"selected": selected, "entries": entries, "padding": entries - selected,
                       "layers": len(layers), "left_out_tensors": len(plan.left_out)},
            "padding_rule": "r = max over layers of ceil(selected / (in + out)); each layer is padded to r*(in+out) "
                            "entries with the lowest flat indices outside the delta, carrying a change of 0 (exact)",
            "layers": layers, "left_out": plan.left_out, "rest_file": REST_FILE if rest else None,
            "load": "PeftModel.from_pretrained(base, DIR)" + (f"; first apply_delta(base, DIR/{REST_FILE})" if rest
                                                               else "")}


def main(cfg: ExportConfig) -> int:
    """Load θ0 (fingerprint-checked), plan and build the adapter, save it with peft, atomically."""
    from dualsft.models import load_model
    from dualsft.runs import build_metadata
    from dualsft.training.delta import DELTA_FILE, SparseDelta, check_base, save_delta
    from dualsft.training.shira import build_shira_adapter, plan_shira

    train_dir = Path(cfg.train_dir) if cfg.train_dir else Path(cfg.run_dir) / "train"
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / f"export-{cfg.format}"
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite or choose another --out")
    info, delta = read_trained_delta(train_dir)
    model_id = cfg.model or info["base_model"]["id"]
    model = load_model(model_id, cfg.dtype or info.get("weights_dtype", "float32"), "cpu")
    check_base(model, delta.base_fingerprint, str(train_dir))
    plan = plan_shira(delta, model, cfg.partial)
    peft_model = build_shira_adapter(model, delta, plan)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # peft copies the whole base head into the adapter when lm_head is adapted; θ0 comes from the base model
    peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
    if plan.left_out:
        keep = sorted(plan.left_out)
        save_delta(tmp / REST_FILE, SparseDelta({n: delta.indices.get(n) for n in keep},
                                                {n: delta.values[n] for n in keep},
                                                {n: delta.shapes[n] for n in keep},
                                                delta.base_model, delta.base_fingerprint))
    record = export_record(plan, info, cfg, bool(plan.left_out))
    write_json(tmp / "export.json", record)
    write_json(tmp / "metadata.json", build_metadata("export", cfg, model_id, delta.base_fingerprint,
                                                     data_files={"delta": train_dir / DELTA_FILE}))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    totals = record["totals"]
    log.info("wrote SHiRA adapter %s: r=%d, %d layers, %d delta entries + %d padding%s", out, plan.r,
             totals["layers"], totals["selected"], totals["padding"],
             f"; {len(plan.left_out)} tensor(s) in {REST_FILE}" if plan.left_out else "")
    return 0
