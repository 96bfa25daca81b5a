"""Train a dualsft selection with your own ``transformers.Trainer`` or TRL ``SFTTrainer`` (README, "Use with
Trainer / TRL / peft"): the selected examples S as a ``datasets.Dataset``, the selected entries m as a
``torch.optim.Optimizer`` that holds state for them only and writes nothing else.

    opt = sparse_optimizer(model, "runs/demo", lr=2e-5)          # SparseAdamW over the mask's entries
    ds = subset_dataset("runs/demo", tokenizer)                 # tokenised exactly as `dualsft train` does
    args = TrainingArguments("out", max_grad_norm=0, lr_scheduler_type="constant", report_to="none")
    Trainer(model, args, train_dataset=ds, data_collator=trainer_collator(tokenizer.pad_token_id),
            optimizers=(opt, None), compute_loss_func=example_mean_loss(args.per_device_train_batch_size)).train()

Where a stock Trainer differs from `dualsft train`, and what these helpers do about it:
- gradient clipping: SparseAdamW folds each dense gradient into [k_p] accumulators the moment autograd
  finishes it and drops ``p.grad``, so Trainer's own clipping (over ``p.grad``) sees no gradient and logs
  ``grad_norm`` 0. Set ``max_grad_norm=0`` in the TrainingArguments and give the clip norm to
  ``sparse_optimizer``: it clips over the selected entries right before each update (``last_grad_norm``).
- learning rate: with ``optimizers=(opt, None)`` Trainer's scheduler scales the optimizer's OWN lr (the
  ``lr`` passed here, the peak); TrainingArguments' ``learning_rate`` is not read.
- loss: Trainer's default is the token mean over a step's response tokens; dualsft's is the mean over the
  step's examples of each example's token mean l(z) (docs/method.md §2): ``example_mean_loss``.
- one process: the gradient hook bypasses DDP's all-reduce; for several GPUs use
  ``torchrun -m dualsft train`` (docs/scaling.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dualsft.config import recorded_config
from dualsft.data.formats import Example, Template, load_examples, tokenize_examples
from dualsft.errors import ArtifactError, ConfigError, NonFiniteLossError
from dualsft.io import read_jsonl
from dualsft.losses import per_example_loss_from_logits
from dualsft.selection.mask import check_mask_matches, compact_indices, load_mask
from dualsft.training.optim import SparseAdamW

log = logging.getLogger(__name__)

SUBSET_FILE, MASK_FILE = "subset.jsonl", "mask.safetensors"
EXTRA_HINT = 'pip install "dualsft[trl]"'


@dataclass(frozen=True)
class Selection:
    """What `dualsft select` chose: the subset S and the mask m.

    Attributes:
        folder: the selection folder (RUN/selection by default).
        records: subset.jsonl rows in pool order (original fields + "index" + "score" φ_data).
        indices: {name: sorted int64 flat indices [k_p]} of the selected entries (names absent: frozen).
        shapes: {name: shape of the full parameter} the mask was made for.
    """

    folder: Path
    records: list[dict]
    indices: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]

    @property
    def k(self) -> int:
        """Number of selected entries."""
        return sum(v.numel() for v in self.indices.values())


def selection_dir(run_dir: str | Path, selection: str = "selection") -> Path:
    """RUN/<selection> (an absolute ``selection`` is used as is, like ``dualsft select --out``), checked to
    hold subset.jsonl and mask.safetensors."""
    d = Path(run_dir) / selection
    for f in (SUBSET_FILE, MASK_FILE):
        if not (d / f).exists():
            raise ArtifactError(f"{d / f} is missing: run `dualsft select --run-dir {run_dir}` first (or pass "
                                "selection= the folder it wrote with --out)")
    return d


def load_selection(run_dir: str | Path, selection: str = "selection") -> Selection:
    """Read RUN/<selection>/subset.jsonl and mask.safetensors."""
    d = selection_dir(run_dir, selection)
    indices, shapes = load_mask(d / MASK_FILE)
    return Selection(d, read_jsonl(d / SUBSET_FILE), indices, shapes)


class ClippedSparseAdamW(SparseAdamW):
    """``SparseAdamW`` that clips the selected entries' gradient to ``max_grad_norm`` inside ``step``, since
    Trainer's own clipping cannot see it (module docstring). ``last_grad_norm``: the norm before clipping
    of the latest step (what `dualsft train` logs as grad_norm). ``max_grad_norm`` 0 or None: no clipping."""

    def __init__(self, params: Iterable[Any], indices: dict[str, torch.Tensor], max_grad_norm: float | None = 1.0,
                 **hyper: Any):
        super().__init__(params, indices, **hyper)
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:  # the closure's backward must land in the accumulators before clipping
            with torch.enable_grad():
                loss = closure()
        norm = self.clip_grad_norm_(self.max_grad_norm)
        self.last_grad_norm = norm
        if not math.isfinite(norm):  # refuse, as `dualsft train` does, before the update touches any weight
            self.zero_grad()
            raise NonFiniteLossError(f"non-finite gradient norm ({norm}) over the selected entries; lower the lr "
                                     "or check the data", [])
        super().step()
        return loss


def sparse_optimizer(model: torch.nn.Module, run_dir: str | Path, lr: float = 2e-5, weight_decay: float = 0.0,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, max_grad_norm: float | None = 1.0,
                     selection: str = "selection") -> ClippedSparseAdamW:
    """AdamW over the mask's entries of ``model`` (``dualsft train --method sparse``'s optimizer), for
    ``Trainer(optimizers=(opt, None))``.

    Refuses (ArtifactError) a mask made for another architecture: every masked name must be a parameter of
    ``model`` with the recorded shape. Side effect, as in `dualsft train`: parameters with no selected entry
    get ``requires_grad=False``. Weight decay applies to the selected entries only; every other entry stays
    bit-identical. ``lr`` is the peak rate that Trainer's scheduler scales. Build it once the model is on its
    training device (state follows the weights at build time; transformers asks this of any optimizer passed
    in ``optimizers=``). Trainer checkpoints hold its state and ``resume_from_checkpoint`` restores it.
    """
    from dualsft.distributed import world_size

    if world_size() > 1:
        raise ConfigError(f"sparse_optimizer runs in one process (world size is {world_size()}): its gradient "
                          "hook bypasses DDP's all-reduce; train on several GPUs with `torchrun -m dualsft train`")
    path = selection_dir(run_dir, selection) / MASK_FILE
    indices, shapes = load_mask(path)
    check_mask_matches(model, shapes, str(path))
    numel = {n: p.numel() for n, p in model.named_parameters()}
    indices = {n: compact_indices(v, numel[n], presorted=True) for n, v in indices.items()}  # int32 index state
    return ClippedSparseAdamW(model.named_parameters(), indices, max_grad_norm, lr=lr, betas=betas, eps=eps,
                              weight_decay=weight_decay)


def run_setting(run_dir: str | Path, key: str, default: Any) -> Any:
    """A common option (template, max_length) as the run used it: RUN/train's metadata, else RUN/scores'
    (the tokenisation the selection was scored with), else ``default``."""
    for stage in ("train", "scores"):
        value = recorded_config(run_dir, stage).get(key)
        if value is not None:
            return value
    return default


def subset_dataset(run_dir: str | Path, tokenizer: Any = None, template: Template | None = None,
                   max_length: int | None = None, drop_empty: bool = False, selection: str = "selection") -> Any:
    """The selected examples as a ``datasets.Dataset``, one row per example, in pool order.

    With a ``tokenizer``: columns input_ids, attention_mask, labels (-100 on prompt tokens), index, made by
    dualsft's own tokenisation, so they equal what `dualsft train` trains on. Plain Trainer: pass
    ``trainer_collator``; TRL ``SFTTrainer`` takes them as a pre-tokenised dataset (labels used as is).
    Without one: columns prompt, completion, index for ``SFTTrainer`` to tokenise itself: conversational
    (lists of {"role", "content"}) for the chat template, text (prompt + "\\n"; TRL appends EOS) otherwise.
    ``template``/``max_length`` default to what the run used (``run_setting``), else chat / 256 (text rows
    are not truncated here: give SFTConfig the same ``max_length``).
    """
    datasets = _require("datasets")
    template = template or run_setting(run_dir, "template", "chat")
    path = selection_dir(run_dir, selection) / SUBSET_FILE
    examples = load_examples(path)
    if tokenizer is None:
        if template == "release":
            log.warning("TRL appends EOS to text completions, which the release template does not train; pass "
                        "tokenizer= for dualsft's exact tokenisation")
        return datasets.Dataset.from_list([sft_row(e, template) for e in examples])
    max_length = max_length or run_setting(run_dir, "max_length", 256)
    toks = tokenize_examples(examples, tokenizer, template, max_length, drop_empty, source=str(path))
    return datasets.Dataset.from_list([{"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids),
                                        "labels": t.labels, "index": t.index} for t in toks])


def sft_row(example: Example, template: Template) -> dict[str, Any]:
    """One example in TRL's prompt/completion form (conversational for the chat template)."""
    if template == "chat":
        prompt = [{"role": r, "content": c} for r, c in example.messages]
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": example.response}],
                "index": example.index}
    return {"prompt": example.prompt_text + "\n", "completion": example.response, "index": example.index}


def trainer_collator(pad_token_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """A ``data_collator`` for plain Trainer: right-pads input_ids / attention_mask and labels (-100), as
    `dualsft train` batches them."""

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(f["input_ids"]) for f in features)
        pad = [T - len(f["input_ids"]) for f in features]
        return {  # each [B, T]
            "input_ids": torch.tensor([list(f["input_ids"]) + [pad_token_id] * n for f, n in zip(features, pad)]),
            "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * n for f, n in zip(features, pad)]),
            "labels": torch.tensor([list(f["labels"]) + [-100] * n for f, n in zip(features, pad)]),
        }

    return collate


def example_mean_loss(examples_per_step: int) -> Callable[..., torch.Tensor]:
    """A ``compute_loss_func`` for Trainer giving dualsft's step loss: Σ_n l_n / B over each micro-batch,
    with l_n the token-mean NLL of example n's response and B = ``examples_per_step`` (per-device batch ×
    gradient accumulation steps). Trainer does not rescale a ``compute_loss_func``'s loss, so the
    accumulated gradient is that of the step's mean loss. A step with fewer than B examples (the end of an
    epoch) is divided by B all the same, where `dualsft train` divides by its actual size."""
    if examples_per_step < 1:
        raise ConfigError(f"examples_per_step must be at least 1, got {examples_per_step}")

    def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        return per_example_loss_from_logits(outputs.logits, labels).sum() / examples_per_step

    return loss


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"dualsft.integrations needs {module!r}: {EXTRA_HINT}") from e
