"""Read instruction data in any supported schema, format it with a template, and tokenise with
response-only labels.

Sources (``dualsft.data.sources``): a JSONL/JSON file, a saved HF ``datasets`` folder (``FOLDER@split``), a
Hub dataset (``hf://owner/name[:config][@split]``); ``?prompt=COL&response=COL`` maps other column names.

Schemas (detected per record, first match wins):
    messages                 chat list of {"role", "content"}: an optional system turn, then user and
                             assistant turns alternating, the LAST assistant turn is the response (with
                             ``assistant_turns="all"`` every assistant turn carries loss: data/turns.py)
    instruction / response   Magicoder; Alpaca's optional ``input`` is appended to the instruction
    instruction / output     Alpaca
    prompt / completion      completion style
    question / answer        reasoning-gym items as written by ``dualsft data build``
Every example keeps ``index``: its position in the source file (0-based, blank lines skipped),
which survives every later stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from dualsft.data.sources import parse_source, read_records
from dualsft.data.turns import assistant_labels, common_prefix
from dualsft.errors import DataFormatError, EmptyResponseError
from dualsft.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

Template = Literal["chat", "plain", "release"]
LossTokens = Literal["response", "answer"]
AssistantTurns = Literal["last", "all"]
ROLES = ("system", "user", "assistant")
SCHEMAS = ("messages", "instruction/response", "instruction/output", "prompt/completion", "question/answer")


@dataclass(frozen=True)
class Example:
    """One normalised instruction/response pair.

    ``messages`` holds the prompt-side chat turns (system/user/earlier assistant) and ``response`` the
    final assistant text. ``record`` is the original object, kept for outputs and answer scoring.
    """

    index: int
    messages: tuple[tuple[str, str], ...]
    response: str
    record: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt_text(self) -> str:
        """The prompt as plain text (user turns joined by newlines)."""
        return "\n".join(content for _, content in self.messages)


def normalise_record(obj: dict[str, Any], where: str, index: int) -> Example:
    """Map one raw record onto an Example; ``where`` (e.g. ``file:line``) goes into every error."""
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataFormatError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        turns = []
        for m in msgs:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataFormatError(f"{where}: each message needs 'role' and 'content', got {m!r:.80}")
            turns.append((str(m["role"]), "" if m["content"] is None else str(m["content"])))
        check_turn_order([r for r, _ in turns], where)
        return Example(index, tuple(turns[:-1]), turns[-1][1], obj)
    pairs = (("instruction", "response"), ("instruction", "output"), ("prompt", "completion"), ("question", "answer"))
    for p, r in pairs:
        if p in obj and r in obj:
            prompt = str(obj[p])
            if p == "instruction" and obj.get("input"):
                prompt = f"{prompt}\n{obj['input']}"
            turns = ((("system", str(obj["system"])),) if obj.get("system") else ()) + (("user", prompt),)
            return Example(index, turns, str(obj[r]), obj)
    present = sorted(obj)[:8]
    missing = _closest_missing(obj)
    raise DataFormatError(
        f"{where}: unknown schema (fields {present}); {missing}. "
        f"Supported: {', '.join(SCHEMAS)}"
    )


def check_turn_order(roles: list[str], where: str) -> None:
    """Raise DataFormatError unless ``roles`` is [system], user, assistant, user, assistant, ..., assistant."""
    unknown = sorted({r for r in roles if r not in ROLES})
    if unknown:
        raise DataFormatError(f"{where}: unsupported message role(s) {unknown}; use {', '.join(ROLES)}")
    if "assistant" not in roles:
        raise DataFormatError(f"{where}: no assistant turn (roles {roles}); the last message must be the "
                              "assistant's response")
    if roles[-1] != "assistant":
        raise DataFormatError(f"{where}: the last message must be the assistant's response, got role {roles[-1]!r}")
    chat = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(chat))]
    if chat != expected:
        raise DataFormatError(f"{where}: turns must be an optional system message, then user and assistant "
                              f"alternating (user first); got roles {roles}")


def _closest_missing(obj: dict[str, Any]) -> str:
    for p, r in (("instruction", "response"), ("prompt", "completion"), ("question", "answer")):
        if p in obj:
            return f"field {r!r} is missing"
        if r in obj:
            return f"field {p!r} is missing"
    return "no prompt/response field pair found"


def load_examples(path: str | Path) -> list[Example]:
    """Read a data source into Examples: a JSONL/JSON file, a saved HF ``datasets`` folder (``FOLDER@split``),
    or ``hf://owner/name[:config][@split]``, each optionally ``?prompt=COL&response=COL`` (data/sources.py).

    Raises DataFormatError naming the file and line (JSONL), item (JSON) or row (datasets) of the first bad
    record, on an empty source, a missing split or a missing column (listing the available ones).
    """
    records = read_records(parse_source(path))
    for where, r in records:
        if not isinstance(r, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(r).__name__}")
    indices = _stable_indices([r for _, r in records])
    return [normalise_record(r, where, i) for (where, r), i in zip(records, indices)]


def _stable_indices(records: list[dict]) -> list[int]:
    """Positions in the file, unless EVERY record carries a distinct integer ``index`` field (as files
    written by dualsft do, e.g. ``selection/subset.jsonl``): then those, so indices survive re-reading."""
    given = [r.get("index") for r in records]
    if all(isinstance(i, int) and not isinstance(i, bool) for i in given) and len(set(given)) == len(given):
        return given  # type: ignore[return-value]
    return list(range(len(records)))


@dataclass
class TokenizedExample:
    """Token ids and labels of one example. labels[t] = -100 on prompt tokens."""

    index: int
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def render(example: Example, tokenizer: Any, template: Template) -> tuple[str, str]:
    """Return (prompt_text, full_text) with full_text = prompt_text + response (+ end marker)."""
    if template in ("plain", "release"):
        prompt = example.prompt_text + "\n"
        eos = tokenizer.eos_token or "" if template == "plain" else ""  # the release trains no end token
        return prompt, prompt + example.response + eos
    if template == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataFormatError("--template chat needs a tokenizer with a chat template; use --template plain")
        msgs = [{"role": r, "content": c} for r, c in example.messages]
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": example.response}], tokenize=False)
        if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to concatenation
            full = prompt + example.response + (tokenizer.eos_token or "")
        return prompt, full
    raise DataFormatError(f"unknown template {template!r}: use 'chat', 'plain' or 'release'")


def tokenize_example(example: Example, tokenizer: Any, template: Template, max_length: int,
                     loss_tokens: LossTokens = "response", assistant_turns: AssistantTurns = "last") -> TokenizedExample:
    """Tokenise with labels on response tokens only, truncating (from the right) to max_length.

    ``assistant_turns="all"`` (chat template only) labels every assistant turn of a multi-turn chat, each
    by the same rule as the final response (data/turns.py); a single-turn example is the same either way.

    ``loss_tokens="answer"`` also masks what the template appends AFTER the response text (the chat
    template's end-of-turn token and newline, the plain template's EOS): the loss then covers the answer's
    own tokens only (docs/method.md §5, scoring variant ``--score-tokens answer``).
    The ``release`` template reproduces the authors' release: ``prompt + "\n" + response`` with no end token,
    and the prompt masked by the length of its OWN tokenisation (not by the common prefix with the full
    text); where a byte-level BPE splits the prompt's trailing whitespace differently inside the full text
    (a prompt that ends in "\n" gives "...\n\n" + response), one prompt token is trained, as in the release.
    """
    if assistant_turns == "all" and _has_earlier_replies(example, template):
        ids, labels = assistant_labels(example.messages + (("assistant", example.response),), tokenizer, loss_tokens)
        return TokenizedExample(example.index, ids[:max_length], labels[:max_length], len(ids) > max_length)
    prompt, full = render(example, tokenizer, template)
    # Tokenise prompt and full text the same way; the prompt's tokens are a prefix of the full text's
    # for BPE tokenisers when the boundary is a newline/special token. We trust the prefix length.
    add_bos = tokenizer.bos_token_id is not None and template != "chat" and getattr(tokenizer, "add_bos_token", False)
    bos = [tokenizer.bos_token_id] if add_bos else []
    p_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    f_ids = bos + tokenizer(full, add_special_tokens=False)["input_ids"]
    n_prompt = len(p_ids) if template == "release" else common_prefix(p_ids, f_ids)
    labels = [IGNORE_INDEX] * n_prompt + f_ids[n_prompt:]
    if loss_tokens == "answer":  # cut the labels where prompt + response (without the end marker) stops
        text_ids = bos + tokenizer(prompt + example.response, add_special_tokens=False)["input_ids"]
        end = max(n_prompt, common_prefix(text_ids, f_ids))
        labels = labels[:end] + [IGNORE_INDEX] * (len(labels) - end)
    elif loss_tokens != "response":
        raise DataFormatError(f"unknown loss tokens {loss_tokens!r}: use 'response' or 'answer'")
    truncated = len(f_ids) > max_length
    return TokenizedExample(example.index, f_ids[:max_length], labels[:max_length], truncated)


def _has_earlier_replies(example: Example, template: Template) -> bool:
    if template != "chat":
        raise DataFormatError(f"--assistant-turns all needs --template chat (got {template!r}): only a chat "
                              "template marks where each assistant turn starts and ends")
    return any(role == "assistant" for role, _ in example.messages)


def check_blank_responses(examples: list[Example], drop_empty: bool, source: str,
                          assistant_turns: AssistantTurns = "last") -> list[Example]:
    """Warn about (or, with ``drop_empty``, drop) examples whose response is empty or whitespace only, and
    with ``assistant_turns="all"`` those with ANY empty assistant turn (every one of them is trained).

    Such an example still has response labels under a template that appends end tokens (the chat
    template's end-of-turn), so without this check it would be scored, selected and trained on silently,
    teaching the model to answer with nothing."""
    def blank(e: Example) -> bool:
        replies = [e.response] + [c for r, c in e.messages if r == "assistant" and assistant_turns == "all"]
        return any(not text.strip() for text in replies)

    bad = [e.index for e in examples if blank(e)]
    if not bad:
        return examples
    what = "an empty or whitespace-only " + ("assistant turn" if assistant_turns == "all" else "response")
    shown = f"{bad[:20]}{'...' if len(bad) > 20 else ''}"
    if drop_empty:
        log.warning("%s: dropped %d example(s) with %s: indices %s", source, len(bad), what, shown)
        return [e for e in examples if not blank(e)]
    log.warning("%s: %d example(s) have %s (indices %s); they are kept and train the model to answer with "
                "nothing: fix the data or pass --drop-empty to drop them", source, len(bad), what, shown)
    return examples


def tokenize_examples(
    examples: list[Example],
    tokenizer: Any,
    template: Template = "chat",
    max_length: int = 512,
    drop_empty: bool = False,
    source: str = "data",
    loss_tokens: LossTokens = "response",
    assistant_turns: AssistantTurns = "last",
) -> list[TokenizedExample]:
    """Tokenise a list; report truncation; reject (or drop, if ``drop_empty``) examples without response tokens.
    ``loss_tokens`` chooses which response tokens carry loss, ``assistant_turns`` which assistant turns of a
    chat (see ``tokenize_example``). This is the one tokenisation path of scoring, training and evaluation.

    Raises EmptyResponseError listing the stable indices of examples with no response token.
    """
    if max_length < 2:
        raise DataFormatError(f"--max-length must be at least 2, got {max_length}")
    if assistant_turns not in ("last", "all"):
        raise DataFormatError(f"unknown assistant turns {assistant_turns!r}: use 'last' or 'all'")
    examples = check_blank_responses(examples, drop_empty, source, assistant_turns)
    toks = [tokenize_example(e, tokenizer, template, max_length, loss_tokens, assistant_turns) for e in examples]
    n_trunc = sum(t.truncated for t in toks)
    if n_trunc:
        log.info("%s: %d of %d examples truncated to %d tokens", source, n_trunc, len(toks), max_length)
    empty = [t.index for t in toks if t.n_response_tokens == 0]
    if empty and not drop_empty:
        raise EmptyResponseError(
            f"{source}: {len(empty)} example(s) have no response tokens after formatting/truncation "
            f"(indices {empty[:20]}{'...' if len(empty) > 20 else ''}); raise --max-length, fix the data, "
            f"or pass --drop-empty to skip them",
            empty,
        )
    if empty:
        log.warning("%s: dropped %d example(s) with no response tokens: indices %s", source, len(empty), empty[:20])
        toks = [t for t in toks if t.n_response_tokens > 0]
    if not toks:
        raise EmptyResponseError(
            f"{source}: all {len(empty)} example(s) have no response tokens at --max-length {max_length} "
            f"(indices {empty[:20]}{'...' if len(empty) > 20 else ''}); raise --max-length or fix the data", empty)
    return toks


def collate(batch: list[TokenizedExample], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of TokenizedExample into tensors.

    Returns input_ids [B, T], attention_mask [B, T], labels [B, T] (IGNORE_INDEX on padding),
    index [B] (stable example indices).
    """
    T = max(len(t.input_ids) for t in batch)
    ids, att, lab = [], [], []
    for t in batch:
        pad = T - len(t.input_ids)
        if padding_side == "right":
            ids.append(t.input_ids + [pad_token_id] * pad)
            att.append([1] * len(t.input_ids) + [0] * pad)
            lab.append(t.labels + [IGNORE_INDEX] * pad)
        else:
            ids.append([pad_token_id] * pad + t.input_ids)
            att.append([0] * pad + [1] * len(t.input_ids))
            lab.append([IGNORE_INDEX] * pad + t.labels)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(att, dtype=torch.long),
        "labels": torch.tensor(lab, dtype=torch.long),
        "index": torch.tensor([t.index for t in batch], dtype=torch.long),
    }


def batches(
    toks: list[TokenizedExample], batch_size: int, pad_token_id: int, sort_by_length: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Split into collated batches in order (or length-sorted, to waste less padding; indices travel along)."""
    order = sorted(range(len(toks)), key=lambda i: len(toks[i].input_ids)) if sort_by_length else range(len(toks))
    seq = [toks[i] for i in order]
    return [collate(seq[i : i + batch_size], pad_token_id) for i in range(0, len(seq), batch_size)]
