"""Tiny seeded models and a byte-level tokenizer built in code, for tests and examples (no downloads)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block with one intra-op torch thread and restore the previous count afterwards.

    Micro models gain nothing from threads, and on shared 2-core machines two OpenMP threads per process
    wait at barriers for each other (measured 5-10x slower under load); torchrun workers run with
    OMP_NUM_THREADS=1, so in-process references then use the same kernels.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges (vocab = 256 bytes + 3 specials) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


VOCAB = 259


def micro_llama(tied: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32, vocab_size: int = VOCAB) -> torch.nn.Module:
    """A 2-layer Llama (hidden 32, 4 heads / 2 KV heads) with random weights, eager attention, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=tied, attn_implementation="eager")
    m = LlamaForCausalLM(cfg)
    _randomise_norms(m, seed)
    return m.to(dtype).eval()


def micro_gpt2(tied: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32, vocab_size: int = VOCAB) -> torch.nn.Module:
    """A 2-layer GPT-2 (n_embd 32, 4 heads; Conv1D layers, biases, LayerNorms), eager attention, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                     tie_word_embeddings=tied, attn_implementation="eager",
                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = GPT2LMHeadModel(cfg)
    _randomise_norms(m, seed)
    return m.to(dtype).eval()


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """Norm weights/biases start at 1/0, which hides bugs that treat them as constants; perturb them."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name.endswith(".bias"):
                p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def toy_records(n: int, seed: int = 0) -> list[dict]:
    """n instruction/response records of short arithmetic, varied lengths (for format and scoring tests)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        a, b = torch.randint(0, 100, (2,), generator=g).tolist()
        pad = " please" * int(torch.randint(0, 4, (1,), generator=g))
        out.append({"instruction": f"What is {a} + {b}?{pad}", "response": f"{a + b}" + " ok" * (i % 3)})
    return out


def paper_score_flags(prefix: str = "") -> list[str]:
    """The CLI flags of the paper's scoring formula (``dualsft.config.PAPER_SCORE``), for tests that pin it
    against today's defaults (LESS's form); ``prefix`` "score." spells them for `dualsft run` / `compare`."""
    from dualsft.config import PAPER_SCORE

    return [x for k, v in PAPER_SCORE.items() for x in (f"--{prefix}{k.replace('_', '-')}", v)]
