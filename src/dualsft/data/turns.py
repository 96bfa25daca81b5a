"""Labels on EVERY assistant turn of a multi-turn chat (``--assistant-turns all``, like TRL's
``assistant_only_loss``): the tokens of each assistant message under the chat template carry loss, all
other tokens (system, user, template decoration before each reply) are IGNORE_INDEX.

Turn i's loss text runs from the end of the conversation rendered up to turn i with the generation prompt
(``<|im_start|>assistant\\n``) to the end of the conversation rendered through turn i (response tokens:
the reply and its end-of-turn marker, as the single-turn rule) or to the end of the reply text (answer
tokens). Fast path: the conversation is tokenised ONCE with character offsets and each span is mapped to
tokens. Oracle (``assistant_labels_reference``): every prefix is tokenised and diffed against the full
token list, i.e. the single-turn rule of ``formats.tokenize_example`` applied turn by turn.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any

from dualsft.errors import DataFormatError
from dualsft.losses import IGNORE_INDEX

Turns = tuple[tuple[str, str], ...]


def render_turns(turns: Turns, tokenizer: Any, loss_tokens: str) -> tuple[str, list[tuple[str, str]]]:
    """(full text, [(text before, text through) each assistant turn's loss span]); both are prefixes of
    the full text. Raises DataFormatError for a template that rewrites earlier turns (then no prefix of the
    conversation is a prefix of its rendering, and per-turn labels are undefined)."""
    if loss_tokens not in ("response", "answer"):
        raise DataFormatError(f"unknown loss tokens {loss_tokens!r}: use 'response' or 'answer'")
    msgs = [{"role": r, "content": c} for r, c in turns]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    bounds = []
    for i, (role, content) in enumerate(turns):
        if role != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        through = (tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False) if loss_tokens == "response"
                   else before + content)
        if not (full.startswith(before) and full.startswith(through)):
            raise DataFormatError("this chat template renders earlier turns differently from the whole conversation "
                                  f"(assistant turn {i}); per-turn labels are undefined: use --assistant-turns last")
        bounds.append((before, through))
    return full, bounds


def assistant_labels(turns: Turns, tokenizer: Any, loss_tokens: str = "response") -> tuple[list[int], list[int]]:
    """(input_ids [T], labels [T]) of a whole conversation, labels on every assistant turn's tokens.

    One tokenisation with offsets: a token is labelled when its characters overlap a turn's span
    [len(before), len(through)). Tokenizers without offsets (slow ones) use the oracle."""
    if not getattr(tokenizer, "is_fast", False):
        return assistant_labels_reference(turns, tokenizer, loss_tokens)
    full, bounds = render_turns(turns, tokenizer, loss_tokens)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    starts = [a for a, _ in enc["offset_mapping"]]  # [T] character offsets, non-decreasing
    ends = [b for _, b in enc["offset_mapping"]]  # [T]
    labels = [IGNORE_INDEX] * len(ids)
    for before, through in bounds:
        first = bisect_right(ends, len(before))  # first token ending after the span start
        last = bisect_left(starts, len(through))  # one past the last token starting before the span end
        labels[first:last] = ids[first:last]
    return ids, labels


def assistant_labels_reference(turns: Turns, tokenizer: Any, loss_tokens: str = "response") -> tuple[list[int], list[int]]:
    """The oracle for ``assistant_labels`` (and the path for slow tokenizers): tokenise the full text and
    each turn's two prefixes; turn i's labels are the full tokens between the prefixes' common-prefix
    lengths with the full token list (exactly the single-turn rule, once per turn)."""
    full, bounds = render_turns(turns, tokenizer, loss_tokens)
    ids = _ids(tokenizer, full)
    labels = [IGNORE_INDEX] * len(ids)
    for before, through in bounds:
        start = common_prefix(_ids(tokenizer, before), ids)
        end = max(start, common_prefix(_ids(tokenizer, through), ids))
        labels[start:end] = ids[start:end]
    return ids, labels


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token id lists (where a rendering starts to differ)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
