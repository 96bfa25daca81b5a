"""`dualsft select`: saved scores -> data subset S and parameter mask m (docs/method.md §5 step 4, §7).

Reads RUN/scores/ (param_scores.safetensors, data_scores.jsonl, metadata.json; for joint refinement also
v.safetensors and RUN/warmup/exp_avg_sq.safetensors) and writes RUN/<--out> (default RUN/selection/):
    subset.jsonl        chosen pool records in pool order: original fields + "index" + "score"
                        (a training file as is)
    mask.safetensors    dualsft-mask-v1 (see selection/mask.py)
    summary.json        budgets, thresholds, stage records, counts per layer / module group / parameter,
                        subset overlap with the pool's task/source values, surrogate I(m, S) if computed
    mask_density.png    layer x module-group density heat-map
    metadata.json       config, model id + fingerprint of the scores, pool fingerprint
No model is loaded and no pass is run unless --model (fingerprint check), --surrogate or --joint-rounds
> 0 asks for it; re-selecting at other budgets into another --out only re-reads the scores.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dualsft.config import opt, require
from dualsft.errors import ArtifactError, DataFormatError, MetadataMismatchError
from dualsft.io import iter_jsonl, load_tensors, write_json, write_jsonl
from dualsft.runs import build_metadata, file_fingerprint, portable_path, prepare_stage_dir, require_stage
from dualsft.selection.mask import save_mask
from dualsft.selection.policy import MaskSelection, MaskSpec, check_mask_request, select_mask, select_subset
from dualsft.selection.report import mask_counts, plot_density, subset_overlap
from dualsft.selection.topk import resolve_budget, single_threaded, torch_threads

HELP = "choose the data subset and the parameter mask from saved scores (no model pass unless asked)"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectConfig:
    """Options of `dualsft select` (CLI flags and YAML keys derive from these fields)."""

    run_dir: str = opt("runs/default", "run folder holding scores/ (and warmup/ for joint refinement)")
    out: str = opt("selection", "output folder, relative to --run-dir (an absolute path is used as is); "
                   "e.g. selection-b0.05-k0.01 keeps several budgets side by side")
    data_budget: float = opt(0.1, "examples to keep: a fraction of the pool in (0, 1] or a count > 1")
    param_budget: float = opt(0.1, "entries to train: a fraction in (0, 1] of ALL trainable entries, or a count > 1")
    mask_sign: Literal["signed", "abs"] = opt("signed", "rank parameter entries by signed φ_param (predicted gain) "
                                              "or by |φ_param|; examples are always ranked by signed φ_data")
    sign: Literal["signed", "abs"] | None = opt(None, "deprecated alias of --mask-sign", deprecated=True)
    quota_layer: float = opt(0.2, "share of k spread evenly over transformer layers")
    quota_module: float = opt(0.2, "share of k spread evenly over module groups (q k v qkv o gate up down other)")
    include: str | None = opt(None, "regex: only parameter names matching it may be selected")
    exclude: str | None = opt(None, "regex: parameter names matching it are never selected (e.g. 'embed')")
    granularity: str = opt("element", "element | row | column | block:RxC (units chosen whole; budget counts entries)")
    joint_rounds: int = opt(0, "rounds of joint mask/subset refinement (each ≈ N + b example passes; loads the model)")
    surrogate: bool = opt(False, "compute I(m, S) of the result (one gradient pass over the subset; loads the model)")
    model: str | None = opt(None, "model to check the scores against / to refine with (default: the scores' model)")
    device: str = opt("auto", "device for --joint-rounds/--surrogate: auto, cpu, cuda ...")
    dtype: str = opt("float32", "model dtype for --joint-rounds/--surrogate")
    batch_size: int = opt(8, "batch size of the passes of --joint-rounds/--surrogate")
    method: str = opt("jvp", "row-score method for --joint-rounds: jvp, ghost or exact")
    plot: bool = opt(True, "write mask_density.png")
    overwrite: bool = opt(False, "replace an existing output folder made with other settings")

    def __post_init__(self) -> None:
        require(self.mask_sign in ("signed", "abs"), "mask-sign", self.mask_sign, "use signed or abs")
        require(self.joint_rounds >= 0, "joint-rounds", self.joint_rounds, "use 0 (independent selection) or more")
        require(self.batch_size >= 1, "batch-size", self.batch_size, "must be at least 1")
        if self.sign is not None:  # the deprecated --sign: resolved into mask_sign, so both spell one config
            log.warning("--sign is deprecated: use --mask-sign (it ranks the mask only; examples are always ranked "
                        "by signed φ_data)")
            require(self.sign in ("signed", "abs"), "sign", self.sign, "use signed or abs")
            object.__setattr__(self, "mask_sign", self.sign)
            object.__setattr__(self, "sign", None)


CONFIG = SelectConfig


def mask_spec(cfg: SelectConfig) -> MaskSpec:
    """The mask policy part of the config."""
    return MaskSpec(cfg.param_budget, cfg.mask_sign, cfg.quota_layer, cfg.quota_module, cfg.include, cfg.exclude,
                    cfg.granularity)


def scores_pool_path(meta: dict, scores_dir: Path) -> str:
    """The pool source recorded in the scores metadata (a file, FOLDER@split or hf://... spec, read again the
    same way), checked against its fingerprint."""
    from dualsft.data.sources import source_fingerprint

    pool = (meta.get("data") or {}).get("pool") or {}
    if not pool.get("path"):
        raise ArtifactError(f"{scores_dir}/metadata.json records no data.pool.path; rerun `dualsft score`")
    path = pool["path"]
    try:
        fp = source_fingerprint(path)["fingerprint"]
    except DataFormatError as e:
        raise ArtifactError(f"the pool {path} recorded in {scores_dir}/metadata.json cannot be read any more ({e}; recorded "
                            "paths are relative to the folder the command ran in): run from there, restore it, or rerun "
                            "`dualsft score`") from e
    if pool.get("fingerprint") and pool["fingerprint"] != fp:
        raise MetadataMismatchError(f"the pool {path} changed since scoring (fingerprint {pool['fingerprint']} "
                                    f"then, {fp} now); rerun `dualsft score` on it", "data.pool.fingerprint")
    return path


def read_data_scores(path: Path) -> tuple[list[int], torch.Tensor]:
    """(stable indices in pool order, φ_data [N] float64) from data_scores.jsonl."""
    idx, sc = [], []
    for ln, row in iter_jsonl(path):
        if "index" not in row or "score" not in row:
            raise ArtifactError(f"{path}:{ln}: expected 'index' and 'score'; rerun `dualsft score`")
        idx.append(int(row["index"]))
        sc.append(float(row["score"]))
    if not idx:
        raise ArtifactError(f"{path} is empty; rerun `dualsft score`")
    return idx, torch.tensor(sc, dtype=torch.float64)


def subset_rows(pool_path: str, indices: list[int], positions: list[int], scores: torch.Tensor) -> tuple[list[dict], list[dict]]:
    """(chosen records with index and score, in pool order; all scored pool records)."""
    from dualsft.data.formats import load_examples

    by_index = {e.index: e.record for e in load_examples(pool_path)}
    missing = [i for i in indices if i not in by_index]
    if missing:
        raise ArtifactError(f"data_scores.jsonl names example indices {missing[:10]} that the pool {pool_path} does "
                            "not have; the scores belong to another pool: rerun `dualsft score`")
    chosen = [{**by_index[indices[p]], "index": indices[p], "score": float(s)} for p, s in zip(positions, scores.tolist())]
    return chosen, [by_index[i] for i in indices]


_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}


def _header(f: Any) -> tuple[int, dict]:
    import json
    import struct

    (n,) = struct.unpack("<Q", f.read(8))
    return n, json.loads(f.read(n))


def read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        _, header = _header(f)
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def read_safetensors(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read (some) tensors of a safetensors file straight into their own memory, no mmap.

    ``safetensors.load_file`` maps the file and copies out of the map, so the page-cache pages it touched
    count in the process's RSS next to the copies (measured: ~2x the file at SmolLM2 scale); here each
    tensor is read from the file into a tensor allocated for it, so memory = the tensors."""
    with open(path, "rb") as f:
        n, header = _header(f)
        out = {}
        for name in names if names is not None else [k for k in header if k != "__metadata__"]:
            info = header[name]
            if info["dtype"] not in _DTYPES:
                raise ArtifactError(f"{path}: {name!r} has dtype {info['dtype']}; expected a float tensor")
            t = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
            f.seek(8 + n + info["data_offsets"][0])
            if f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != info["data_offsets"][1] - info["data_offsets"][0]:
                raise ArtifactError(f"{path} is truncated at {name!r}; rerun `dualsft score`")
            out[name] = t
    return out


def _sum_at(path: Path, indices: dict[str, torch.Tensor]) -> float:
    """Σ of a saved per-entry statistic over the mask (one tensor in memory at a time), float64."""
    total = 0.0
    for name, idx in indices.items():
        total += float(read_safetensors(path, [name])[name].view(-1)[idx.long()].double().sum())
    return total


def main(cfg: SelectConfig) -> int:
    """Run the selection stage; returns 0. Single-threaded outside model passes (see topk.single_threaded)."""
    threads = torch.get_num_threads()
    with single_threaded():
        return _run(cfg, threads)


def _run(cfg: SelectConfig, threads: int) -> int:
    t0 = time.time()
    run = Path(cfg.run_dir)
    smeta = require_stage(run, "scores", ("param_scores.safetensors", "data_scores.jsonl"))
    sdir = run / "scores"
    pool_path = scores_pool_path(smeta, sdir)
    indices, phi_data = read_data_scores(sdir / "data_scores.jsonl")
    shapes_all = read_safetensors_shapes(sdir / "param_scores.safetensors")
    # every request error before anything is written, so a corrected rerun finds no half-made folder
    resolve_budget(cfg.data_budget, len(indices), "--data-budget", "pool examples")
    check_mask_request(shapes_all, mask_spec(cfg))
    model = None
    if cfg.model or cfg.joint_rounds > 0 or cfg.surrogate:
        with torch_threads(threads):
            model = _checked_model(cfg, smeta)
    model_info = smeta.get("model") or {}
    meta = build_metadata("selection", cfg, model_info.get("id"), model_info.get("fingerprint"),
                          data_files={"pool": pool_path},
                          extra={"scores": {"folder": portable_path(sdir),
                                            "metadata_fingerprint": file_fingerprint(sdir / "metadata.json")}})
    try:
        out = prepare_stage_dir(run, cfg.out, meta, overwrite=cfg.overwrite)
    except MetadataMismatchError as e:
        raise MetadataMismatchError(f"{e}; or write this selection elsewhere with --out", e.field) from e

    sub = select_subset(phi_data, cfg.data_budget)  # always signed φ_data (docs/method.md §5 step 4)
    scores = read_safetensors(sdir / "param_scores.safetensors")
    if model is not None:
        from dualsft.selection.mask import check_mask_matches

        check_mask_matches(model, shapes_all)
    t_sel = time.time()
    mask = select_mask(scores, mask_spec(cfg), consume=True)
    del scores
    mask_seconds = time.time() - t_sel
    positions, chosen_scores, joint = sub.positions, phi_data[sub.positions], None
    if model is not None and (cfg.joint_rounds > 0 or cfg.surrogate):
        with torch_threads(threads):
            joint = _refine(cfg, model, smeta, run, pool_path, indices, mask, positions, chosen_scores, sub.b)
        mask, positions, chosen_scores = joint.mask, joint.positions, joint.scores

    chosen, pool_records = subset_rows(pool_path, indices, positions.tolist(), chosen_scores)
    write_jsonl(out / "subset.jsonl", chosen)
    save_mask(out / "mask.safetensors", mask.indices, mask.shapes)
    counts = mask_counts(mask.indices, mask.shapes)
    summary = _summary(cfg, mask, sub, chosen, pool_records, counts, joint)
    summary["param"]["phi_param_sum_over_mask"] = _sum_at(sdir / "param_scores.safetensors", mask.indices)
    if cfg.plot:
        plot_density(counts, out / "mask_density.png",
                     f"mask density: k={mask.k} of d={mask.d} ({mask.n_selected / mask.d:.2%}), {mask_spec(cfg).granularity}")
    summary["timing_s"] = {"mask_selection": mask_seconds, "total": time.time() - t0}
    write_json(out / "summary.json", summary)
    log.info("selected %d of %d examples and %d of %d entries into %s (%.1f s)", len(chosen), sub.N,
             mask.n_selected, mask.d, out, time.time() - t0)
    return 0


def _summary(cfg: SelectConfig, mask: MaskSelection, sub: Any, chosen: list[dict], pool_records: list[dict],
             counts: dict, joint: Any) -> dict:
    glob = [s for s in mask.stages if s["stage"] == "global"]
    data_scores = [r["score"] for r in chosen]
    summary: dict[str, Any] = {
        "data": {"budget": cfg.data_budget, "b": sub.b, "N": sub.N, "selected": len(chosen), "sign": "signed",
                 "chosen_by": "top-b of phi_data" if joint is None or joint.history[-1]["step"] == "start"
                 else "joint refinement (the best pair visited; threshold is the independent top-b's)",
                 "threshold": sub.threshold, "min_selected_score": min(data_scores) if data_scores else None,
                 "phi_data_sum_over_subset": float(sum(data_scores)),
                 "overlap": subset_overlap(pool_records, chosen)},
        "param": {"budget": cfg.param_budget, "k": mask.k, "d": mask.d, "eligible": mask.eligible,
                  "selected": mask.n_selected, "density": mask.n_selected / mask.d, **asdict(mask_spec(cfg)),
                  "global_threshold": glob[0]["threshold"] if glob else None, "stages": mask.stages,
                  **counts},
    }
    if joint is not None:
        summary["surrogate"] = {"I_history": joint.history, "I_final": max(h["I"] for h in joint.history),
                                "passes": joint.passes, "parameter_step_monotone_guaranteed": joint.monotone_guaranteed,
                                "rounds_requested": cfg.joint_rounds}
    return summary


def _checked_model(cfg: SelectConfig, smeta: dict) -> torch.nn.Module:
    """Load --model (default: the scores' model) and refuse it if its weights are not the scored ones."""
    from dualsft.models import load_model, model_fingerprint
    from dualsft.runs import check_same_model

    model_id = cfg.model or (smeta.get("model") or {}).get("id")
    if not model_id:
        raise ArtifactError("the scores metadata records no model id; pass --model")
    model = load_model(model_id, dtype=cfg.dtype, device=cfg.device)
    check_same_model(smeta, model_fingerprint(model), "RUN/scores")
    return model


def _refine(cfg: SelectConfig, model: torch.nn.Module, smeta: dict, run: Path, pool_path: str, indices: list[int],
            mask: MaskSelection, positions: torch.Tensor, scores: torch.Tensor, b: int) -> Any:
    """Joint refinement (or, with 0 rounds, just I of the independent pair) with the real scoring engine."""
    from dualsft.data.formats import batches, load_examples, tokenize_examples
    from dualsft.models import load_tokenizer
    from dualsft.scoring.rows import row_scores
    from dualsft.scoring.settings import load_settings
    from dualsft.scoring.stats import gradient_sum, surrogate_improvement, trainable_params
    from dualsft.selection.joint import refine_jointly

    scoring = load_settings(run / "scores")  # η, order, template, max_length of the scores: one typed record
    eta, order = scoring.eta, scoring.order
    if scoring.data_score != "inner" and cfg.joint_rounds > 0:
        log.warning("the scores rank examples by --data-score %s; joint refinement starts from that subset but its "
                    "data steps rank the INNER scores ⟨u(S)⊙m, g_n⟩ (docs/method.md §7)", scoring.data_score)
    if (scoring.precondition != "none" or scoring.data_params != "all") and cfg.joint_rounds > 0:
        log.warning("the scores use --precondition %s / --data-params %s; joint refinement's u(S) and its data steps "
                    "use the paper's u over every parameter (docs/method.md §7)", scoring.precondition,
                    scoring.data_params)
    v = load_tensors(run / "scores" / "v.safetensors")
    c = load_tensors(curvature_path(smeta, run)) if order == 2 else None
    _check_same_shapes(mask.shapes, v, "scores/v.safetensors")
    if c is not None:
        _check_same_shapes(mask.shapes, c, "warmup/exp_avg_sq.safetensors")
    tok = load_tokenizer(scoring.model)
    by_index = {e.index: e for e in load_examples(pool_path)}
    toks = tokenize_examples([by_index[i] for i in indices], tok, scoring.template, scoring.max_length,
                             drop_empty=False, source="pool", loss_tokens=scoring.score_tokens,  # type: ignore[arg-type]
                             assistant_turns=scoring.assistant_turns)  # type: ignore[arg-type]
    params = trainable_params(model)
    pad = tok.pad_token_id
    device = next(model.parameters()).device
    v = {n: t.to(device) for n, t in v.items()}
    c = {n: t.to(device) for n, t in c.items()} if c is not None else None

    def grad_sum(pos: torch.Tensor) -> dict[str, torch.Tensor]:
        return gradient_sum(model, batches([toks[i] for i in pos.tolist()], cfg.batch_size, pad), params)

    def rows(u_masked: dict[str, torch.Tensor]) -> torch.Tensor:
        return row_scores(model, batches(toks, cfg.batch_size, pad), u_masked, method=cfg.method)[0]

    def surrogate(v_: dict, G_S: dict, m: dict) -> float:
        return surrogate_improvement(v_, c, G_S, m, eta)

    return refine_jointly(v, c, eta, mask_spec(cfg), mask, positions, scores, b, cfg.joint_rounds,
                          grad_sum, rows, surrogate)


def curvature_path(smeta: dict, run: Path) -> Path:
    """c used by the scores (data.curvature in their metadata), else RUN/warmup/exp_avg_sq.safetensors."""
    rec = ((smeta.get("data") or {}).get("curvature") or {}).get("path")
    path = Path(rec) if rec else run / "warmup" / "exp_avg_sq.safetensors"
    if not path.exists():
        raise ArtifactError(f"the curvature c ({path}) is missing; rerun `dualsft warmup`, or use scores of --order 1")
    return path


def _check_same_shapes(shapes: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], what: str) -> None:
    for n, s in shapes.items():
        if n not in tensors or tuple(tensors[n].shape) != tuple(s):
            got = tuple(tensors[n].shape) if n in tensors else "missing"
            raise ArtifactError(f"{what}: {n!r} is {got}, the scores have {tuple(s)}; they come from different "
                                "models or runs: rerun `dualsft score`")
