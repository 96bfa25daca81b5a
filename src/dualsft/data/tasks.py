"""The embedded reasoning-gym tasks: their generator settings, the answer-only prompt suffix, and the
scorer that turns a generated text into a score.

A task is a reasoning-gym generator with a SMALL config (short prompts, answers of a few tokens), so
that SmolLM2-135M can learn something on 2 CPU cores in minutes. Every record written by
``dualsft data build`` carries, under ``"rg"``, what the task's own scorer needs later:

    "rg": {"dataset": name, "config": {...generator kwargs...}, "seed": s, "idx": i, "metadata": {...}}

``score_answer(record, generated_text)`` rebuilds the reasoning-gym scorer from ``rg`` and scores the
answer extracted from a generation (see ``extract_answer``). A record without ``rg`` (any user data)
is scored by exact match of the extracted answer against its reference response.

Every task also names an ANSWER TYPE, a coarse category of its reference answer (``TaskSpec.answer_type``;
``answer_type_of(task, answer)``): the number of digits for numeric answers, the count itself (rare high
counts pooled) for counting tasks, the word length for spelling. ``dualsft data build`` stratifies the
target task's splits by it, so that val, dev and test carry the same mix (issue 13: a 32-example val split
with 41% two-digit answers against 19% in test pulled the mean target gradient, docs/method.md §4, towards
two-digit examples), and selection reports show the subset's mix by it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dualsft.errors import ConfigError


def digits_type(answer: str) -> str:
    """Numeric answers: digits of |answer|, with the sign: "7" -> "1-digit", "-12" -> "negative 2-digit"."""
    n = int(answer.strip())
    digits = f"{len(str(abs(n)))}-digit"
    return f"negative {digits}" if n < 0 else digits


def count_type(cap: int) -> Callable[[str], str]:
    """Small counts: the count itself, counts of ``cap`` or more pooled ("3+"), so no category is tiny."""
    def classify(answer: str) -> str:
        n = int(answer.strip())
        return str(n) if n < cap else f"{cap}+"
    return classify


def length_type(answer: str) -> str:
    """Word answers: their length in characters ("olleh" -> "5 letters")."""
    return f"{len(answer.strip())} letters"


@dataclass(frozen=True)
class TaskSpec:
    """One embedded task: reasoning-gym dataset name, generator kwargs, the instruction appended to every
    question so that the expected response is the bare answer, and the answer-type function (reference
    answer -> category label, see the module docstring)."""

    dataset: str
    config: dict[str, Any] = field(default_factory=dict)
    suffix: str = " Answer with the number only."
    answer_type: Callable[[str], str] = digits_type


# Small configs: prompts of 30-90 tokens with the chat template, answers of 1-4 tokens (SmolLM2
# tokenizer). Measured zero-shot (16 held-out items per task, greedy, 8 new tokens): base
# SmolLM2-135M-Instruct gets 0/16 exact matches on every task: it answers in sentences ("The answer
# is 1.", "8 * 2 = 16") instead of the bare answer. chain_sum (2 one-digit terms, 200 distinct
# questions) is the default target: 64 examples of it, 8 full fine-tuning steps (batch 8, lr 1e-4),
# took it from 0 to 47% exact match on held-out items.
TASKS: dict[str, TaskSpec] = {
    "chain_sum": TaskSpec("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    # 1x1-digit (100 distinct questions) or 2x2-digit terms, half each per draw; a large draw of DISTINCT
    # questions runs out of the 1-digit ones (634 questions for val/test 256, dev 64, pool 58: about 16%)
    "products": TaskSpec("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}),
    "basic_arithmetic": TaskSpec("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                      "max_digits": 2, "allow_parentheses": False,
                                                      "allow_negation": False, "operators": ["+", "-", "*"]}),
    "leg_counting": TaskSpec("leg_counting", {"min_animals": 1, "max_animals": 2, "max_instances": 3}),
    # counts 1 (59%), 2 (27%), 3+ (14%)
    "letter_counting": TaskSpec("letter_counting", {"min_words": 3, "max_words": 5}, answer_type=count_type(3)),
    "gcd": TaskSpec("gcd", {"min_value": 1, "max_value": 50}),
    # every answer has one digit: the bit count itself, 0 to 8, with 6+ pooled (14%); 1 bit is the rarest (4%)
    "count_bits": TaskSpec("count_bits", {"max_n": 255}, answer_type=count_type(6)),
    "spell_backward": TaskSpec("spell_backward", {"min_word_len": 3, "max_word_len": 5},
                               suffix=" Answer with the reversed word only.", answer_type=length_type),
}


def task_spec(name: str) -> TaskSpec:
    """The embedded TaskSpec of ``name``; unknown names raise ConfigError listing the known ones."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; embedded tasks: {', '.join(TASKS)}")
    return TASKS[name]


def answer_type_of(task: str, answer: str) -> str | None:
    """The answer-type label of an embedded task's reference answer; None for tasks not embedded here
    (HumanEval, user data). An answer the task's function cannot read (not a number where one is
    expected) is labelled "other" rather than failing a data build."""
    if task not in TASKS:
        return None
    try:
        return TASKS[task].answer_type(answer)
    except ValueError:
        return "other"


_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)


def extract_answer(generated_text: str, special_tokens: tuple[str, ...] = ()) -> str:
    """The answer part of a generation: strict, so that only an answer-only response counts.

    Drops special tokens (e.g. ``<|im_end|>``), uses the inside of ``<answer>...</answer>`` when present
    (reasoning-gym's convention), then keeps the first non-empty line, stripped of whitespace and of
    one trailing period. "The answer is 7." therefore does NOT extract to "7": the prompt asks for the
    answer only, and exact match measures whether the model does that and is right.
    """
    text = generated_text
    for tok in special_tokens:
        if tok:
            text = text.replace(tok, "\n")
    m = _ANSWER_TAG.search(text)
    if m:
        text = m.group(1)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    first = lines[0]
    return first[:-1].rstrip() if first.endswith(".") and len(first) > 1 else first


@functools.lru_cache(maxsize=64)
def _scorer(dataset: str, config_json: str) -> Any:
    """A reasoning-gym dataset object (only its ``score_answer`` is used), cached per (name, config)."""
    import reasoning_gym

    kwargs = json.loads(config_json)
    return reasoning_gym.create_dataset(dataset, size=1, seed=0, **kwargs)


def reference_answer(record: dict[str, Any]) -> str:
    """The reference response of a record in any schema that has one."""
    for key in ("answer", "response", "output", "completion"):
        if key in record:
            return str(record[key])
    msgs = record.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict):
        return str(msgs[-1].get("content", ""))
    raise ConfigError(f"record has no reference answer (fields {sorted(record)[:8]})")


def score_answer(record: dict[str, Any], generated_text: str, special_tokens: tuple[str, ...] = ()) -> float:
    """Score one generation for one record in [0, 1] (1 = correct).

    Records with ``rg`` are scored by their reasoning-gym task's own ``score_answer`` on the extracted
    answer (some tasks give partial credit below 1; exact-match accuracy counts only 1.0). Other
    records: 1.0 if the extracted answer equals the extracted reference answer, else 0.0.
    """
    answer = extract_answer(generated_text, special_tokens)
    rg = record.get("rg")
    if not rg:
        return float(answer == extract_answer(reference_answer(record)))
    scorer = _scorer(rg["dataset"], json.dumps(rg.get("config", {}), sort_keys=True))
    entry = {"question": record.get("question", ""), "answer": str(record["answer"]),
             "metadata": rg.get("metadata", {})}
    try:
        score = scorer.score_answer(answer, entry)
    except Exception:  # noqa: BLE001 - some scorers raise on unparsable answers; that is a wrong answer
        score = 0.0
    return float(score or 0.0)
