"""`dualsft estimate`: per-stage memory PER RANK for a model config, without loading any weight.

    dualsft estimate --model llama-3.2-3b --world-size 8 --stats sharded
    dualsft estimate --model path/to/hf_folder_or_config.json --batch-size 4 --seq-len 2048 --json

The model is built on the meta device (``accelerate.init_empty_weights``) from its config, so the
parameter count P (= d, the trainable entries) and the largest tensor are exact for any architecture
transformers knows. Presets with the dims written inline (no hub access needed): see ``PRESETS``.

What is counted (bytes; P parameters, k = --k-fraction·P selected entries, N = --world-size):
    weights              P × weight bytes (bf16: 2), replicated on every rank (data parallel)
    teacher θ0           same again during the anchor pass of `score` (v_prior needs both models)
    gradient (transient) P × weight bytes: one dense backward of all weights at a time (score, warm-up)
    statistics           float32 v, c, G, u: 4 × 4 bytes × P, then by --stats: replicated (×1),
                         sharded by parameter across ranks (÷N), offload (0 on the device, in CPU RAM)
    scoring extras       float32 φ_param: 4 × P (same --stats); v_new and v_prior are folded into v before the
                         pool pass and freed, so at the peak (the end of the pool pass) the orchestrator holds
                         v, c, G, u and φ_param (20 bytes × P); under FSDP2 with bf16 weights the u slots add
                         a bf16 copy of u's rows (2 × P / N), with float32 weights u reads the slots' rows
    sparse state         SparseAdamW: exp_avg 4 + exp_avg_sq 4 + accumulator 4 + int32 index 4
                         (+ float32 master 4 for bf16 weights) bytes × k, replicated (k is small)
    dense grad (sparse)  the largest tensor × weight bytes: the hook gathers then frees each dense grad
    score FSDP2          weights, teacher, gradient shards ÷N; statistics and extras ÷N (every rank holds its rows
                         of v, c, G, u, φ_param); one gathered layer WITH its u (2 × 2 × P/layers × weight
                         bytes) and the root unit (embeddings, head; kept whole through the step) with its u
    sparse FSDP2         weights ÷N + one gathered layer (2 × P/layers, forward and backward buffers),
                         the reduce-scattered gradient shards (P/N × weight bytes), state for k/N entries
    AdamW state (dense)  full FT as implemented (torch AdamW on bf16 weights: grads + 2 moments in bf16,
                         6·P bytes), and the FSDP/ZeRO-3 plan (bf16 grads + fp32 master + 2 fp32 moments,
                         14·P bytes, ÷N, weights ÷N too)
    activations          ROUGH: B × T × layers × (6h + 2·kv + 4·I) × act bytes (no checkpointing), plus
                         eager attention probabilities B × heads × T² × act bytes per layer, plus the
                         logits B × T × V × 10 bytes (bf16 logits, fp32 log-softmax and its gradient);
                         --gradient-checkpointing (warm-up, training, and scoring with --method ghost or
                         exact, `dualsft score --gradient-checkpointing`; jvp refuses it): B × T × layers ×
                         h × act bytes (each layer's input) + one layer's full activations + the logits;
                         --loss-chunk C (warm-up and training only): the logits term is one chunk's,
                         min(C, B·T) × V × 10 bytes, instead of B × T × V × 10
Real peaks add the CUDA context (~0.5–1 GiB), allocator fragmentation and framework buffers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from dualsft.config import opt
from dualsft.errors import ConfigError

HELP = "print per-stage memory per rank for a model config (no weights loaded): weights, statistics, state"
log = logging.getLogger(__name__)
GIB = 1024**3

# Published config dims (config.json of each model), written inline: no hub access at run time.
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "tie_word_embeddings": True},
    "llama-3.2-3b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
                     "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
                     "head_dim": 128, "tie_word_embeddings": True},
    "llama-3.1-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "head_dim": 128, "tie_word_embeddings": False},
    "gemma-2-9b": {"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336,
                   "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8,
                   "head_dim": 256, "tie_word_embeddings": True},
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class EstimateConfig:
    """Options of `dualsft estimate`."""

    model: str = opt("llama-3.2-3b", f"a preset ({', '.join(PRESETS)}), an HF folder or a config.json")
    world_size: int = opt(1, "N: processes (GPUs) the run uses")
    batch_size: int = opt(4, "B: examples per forward/backward on one rank (micro-batch)")
    seq_len: int = opt(1024, "T: tokens per example (padded length)")
    k_fraction: float = opt(0.1, "k/d: fraction of entries the mask selects (sparse training)")
    stats: Literal["replicated", "sharded", "offload"] = opt(
        "replicated", "where the float32 statistics live: every rank (implemented), sharded by parameter "
        "across ranks, or offloaded to CPU (written down, see docs/scaling.md)")
    weights_dtype: Literal["bfloat16", "float16", "float32"] = opt("bfloat16", "dtype of the weights")
    attention: Literal["eager", "sdpa"] = opt("sdpa", "attention kernel of scoring: sdpa (--method ghost or "
                                             "exact, the default) keeps no probabilities; eager (--method jvp) "
                                             "stores B·heads·T² per layer")
    gradient_checkpointing: bool = opt(False, "warm-up, training and scoring with --gradient-checkpointing: "
                                              "only each layer's input is kept, one layer's activations at a time "
                                              "(scoring: with --attention sdpa, i.e. --method ghost or exact; "
                                              "jvp refuses the flag)")
    loss_chunk: int = opt(0, "warm-up and training with --loss-chunk C: the logits of C positions at a time "
                             "instead of the whole batch's (0: full logits)")
    json: bool = opt(False, "print JSON instead of a table")


CONFIG = EstimateConfig


@dataclass(frozen=True)
class ModelDims:
    """What the estimate needs from a model config: exact counts from a meta-device build."""

    name: str
    params: int  # P = d, unique (tied once)
    largest_tensor: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int
    vocab: int
    linear_in_out: int  # Σ (in + out) over the linear layers of the blocks (LoRA's r·(in+out))
    outside_layers: int = 0  # entries outside the decoder layers (embeddings, final norm, head): FSDP's root unit


def load_config(model: str) -> Any:
    """A transformers config from a preset name, an HF folder or a config.json (nothing downloaded)."""
    from transformers import AutoConfig

    if model in PRESETS:
        d = dict(PRESETS[model])
        return AutoConfig.for_model(d.pop("model_type"), **d)
    p = Path(model)
    if p.is_file() and p.suffix == ".json":
        d = json.loads(p.read_text())
        return AutoConfig.for_model(d.pop("model_type"), **d)
    if p.is_dir() and (p / "config.json").exists():
        return AutoConfig.from_pretrained(str(p))
    raise ConfigError(f"--model {model!r} is not a preset ({', '.join(PRESETS)}), an HF folder with a "
                      "config.json, or a config.json file; the estimate never downloads")


def model_dims(config: Any, name: str) -> ModelDims:
    """Build the model on the meta device (no memory) and count its parameters exactly."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # on the meta device the tie is not made by from_config; tied weights count once
    params = dict(model.named_parameters())  # tied weights once
    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return ModelDims(name=name, params=sum(p.numel() for p in params.values()),
                     largest_tensor=max(p.numel() for p in params.values()), layers=int(config.num_hidden_layers),
                     hidden=int(config.hidden_size), intermediate=int(config.intermediate_size), heads=heads,
                     kv_dim=int(getattr(config, "num_key_value_heads", heads)) * head_dim,
                     vocab=int(config.vocab_size), linear_in_out=sum(m.in_features + m.out_features for m in linear),
                     outside_layers=sum(p.numel() for n, p in params.items() if ".layers." not in n and ".h." not in n))


def activation_bytes(m: ModelDims, batch: int, seq: int, act_bytes: int, eager: bool,
                     checkpointed: bool = False, loss_chunk: int = 0) -> int:
    """ROUGH activation memory of one forward+backward (see module docstring). ``checkpointed``: every layer
    keeps only its input (T × h per example) and one layer's full activations exist at a time (the recompute).
    ``loss_chunk`` > 0: the logits of that many positions at a time (losses.chunked_per_example_loss)."""
    per_token_layer = (6 * m.hidden + 2 * m.kv_dim + 4 * m.intermediate) * act_bytes
    attn = m.heads * seq * seq * act_bytes if eager else 0  # per example per layer
    logits = (min(loss_chunk, batch * seq) if loss_chunk > 0 else batch * seq) * m.vocab * 10
    if checkpointed:
        return batch * (m.layers * seq * m.hidden * act_bytes + seq * per_token_layer + attn) + logits
    return batch * m.layers * (seq * per_token_layer + attn) + logits


def stage_memory(m: ModelDims, cfg: EstimateConfig) -> dict[str, dict[str, int]]:
    """{stage: {component: bytes per rank}} for warm-up, score, sparse/full/LoRA training."""
    wb, P, N = DTYPE_BYTES[cfg.weights_dtype], m.params, cfg.world_size
    share = {"replicated": 1.0, "sharded": 1.0 / N, "offload": 0.0}[cfg.stats]
    eager = cfg.attention == "eager"  # scoring with --method jvp, which refuses --gradient-checkpointing
    acts = activation_bytes(m, cfg.batch_size, cfg.seq_len, wb, eager, cfg.gradient_checkpointing and not eager)
    acts_sdpa = activation_bytes(m, cfg.batch_size, cfg.seq_len, wb, False, cfg.gradient_checkpointing,
                                 cfg.loss_chunk)
    k = int(cfg.k_fraction * P)
    sparse_per_entry = 16 + (4 if wb < 4 else 0)
    lora_params = 16 * m.linear_in_out  # r = 16
    gathered = 2 * wb * P // max(m.layers, 1)  # FSDP: one layer gathered (forward and backward buffers)
    return {
        "warmup (full AdamW, DDP as implemented)": {
            "weights": wb * P, "gradients": wb * P, "adam_moments": 2 * wb * P, "activations": acts_sdpa},
        "warmup (FSDP2, --sharding fsdp)": {
            "weights": int(wb * P / N), "gathered_layer": gathered,
            "gradients": int(wb * P / N), "adam_moments": int(2 * wb * P / N), "activations": acts_sdpa},
        "score (ghost/jvp rows, anchor pass)": {
            "weights": wb * P, "teacher_theta0": wb * P, "gradient_transient": wb * P,
            "statistics_v_c_G_u": int(16 * P * share), "scoring_extras": int(4 * P * share), "activations": acts},
        "score (FSDP2, --sharding fsdp)": {
            "weights": int(wb * P / N), "teacher_theta0": int(wb * P / N), "gradient_shards": int(wb * P / N),
            "gathered_layer_and_u": 2 * gathered, "root_unit_and_u": 2 * wb * m.outside_layers,
            "statistics_v_c_G_u": int(16 * P / N), "scoring_extras": int(4 * P / N),
            "u_slots": int(wb * P / N) if wb != 4 else 0, "activations": acts},
        "train sparse (SparseAdamW, k entries)": {
            "weights": wb * P, "sparse_state": sparse_per_entry * k, "dense_grad_transient": wb * m.largest_tensor,
            "activations": acts_sdpa},
        "train sparse (FSDP2, --sharding fsdp)": {
            "weights": int(wb * P / N), "gathered_layer": gathered,
            "sparse_state": int(sparse_per_entry * k / N), "dense_grad_shard": int(wb * P / N),
            "activations": acts_sdpa},
        "train full (DDP as implemented)": {
            "weights": wb * P, "gradients": wb * P, "adam_moments": 2 * wb * P, "activations": acts_sdpa},
        "train full (FSDP full-shard, fp32 master; plan)": {
            "weights": int(wb * P / N), "gradients": int(wb * P / N), "master_and_moments": int(12 * P / N),
            "gathered_layer": gathered, "activations": acts_sdpa},
        "train lora (r=16)": {
            "weights": wb * P, "adapters_grads_moments": 16 * lora_params, "activations": acts_sdpa},
    }


def cpu_bytes(m: ModelDims, cfg: EstimateConfig) -> int:
    """Host RAM per node for offloaded statistics (16 + 4 bytes per entry: v, c, G, u, φ_param), 0 otherwise."""
    return 20 * m.params if cfg.stats == "offload" else 0


def render(m: ModelDims, cfg: EstimateConfig, stages: dict[str, dict[str, int]]) -> str:
    """A plain-text table of GiB per rank per stage and component."""
    lines = [f"{m.name}: P = d = {m.params / 1e9:.2f}B entries, {cfg.weights_dtype} weights, N = {cfg.world_size} "
             f"rank(s), B = {cfg.batch_size}, T = {cfg.seq_len}, k = {cfg.k_fraction:g}·d, statistics "
             f"{cfg.stats}" + (f" (host RAM {cpu_bytes(m, cfg) / GIB:.1f} GiB)" if cfg.stats == "offload" else ""),
             "GiB per rank:"]
    for stage, parts in stages.items():
        detail = ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items())
        lines.append(f"  {stage:<50s} {sum(parts.values()) / GIB:8.1f}   ({detail})")
    lines.append("activations are rough (" + (checkpointed_stages(cfg) if cfg.gradient_checkpointing
                 else "no checkpointing") + (f"; warm-up/training logits {cfg.loss_chunk} positions at a time"
                                             if cfg.loss_chunk else "") + "); add ~1 GiB CUDA context and allocator slack")
    return "\n".join(lines)


def checkpointed_stages(cfg: EstimateConfig) -> str:
    """Which stages the activation estimate checkpoints: all, but scoring only without eager attention (jvp)."""
    return "warm-up/training checkpointed, scoring not (jvp)" if cfg.attention == "eager" else "every stage checkpointed"


def main(cfg: EstimateConfig) -> int:
    """Print the estimate (table or JSON)."""
    if cfg.world_size < 1 or cfg.batch_size < 1 or cfg.seq_len < 1 or not 0 < cfg.k_fraction <= 1:
        raise ConfigError("--world-size, --batch-size, --seq-len must be >= 1 and --k-fraction in (0, 1]")
    m = model_dims(load_config(cfg.model), cfg.model)
    stages = stage_memory(m, cfg)
    if cfg.json:
        print(json.dumps({"model": asdict(m), "config": asdict(cfg), "bytes_per_rank": stages,
                          "gib_per_rank": {s: sum(p.values()) / GIB for s, p in stages.items()},
                          "host_bytes": cpu_bytes(m, cfg)}, indent=2))
    else:
        print(render(m, cfg, stages))
    return 0
