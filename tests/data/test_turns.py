"""--assistant-turns all: every assistant turn of a chat carries loss; fast path vs the per-prefix oracle."""

from __future__ import annotations

import logging

import pytest
import torch

from dualsft.config import CommonConfig
from dualsft.data.formats import Example, collate, normalise_record, tokenize_example, tokenize_examples
from dualsft.data.turns import assistant_labels, assistant_labels_reference
from dualsft.errors import ConfigError, DataFormatError
from dualsft.losses import IGNORE_INDEX, per_example_loss
from dualsft.testing import CHAT_TEMPLATE, micro_llama


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


CHATS = [
    chat(("user", "2+3?"), ("assistant", "5"), ("user", "times 2?"), ("assistant", "10")),
    chat(("system", "Be brief."), ("user", "hi"), ("assistant", "hello there"), ("user", "1+1?"),
         ("assistant", "2"), ("user", "and 2+2?"), ("assistant", "4, é ☃")),  # multi-byte characters
    chat(("user", "q"), ("assistant", "a\n\nb"), ("user", "again\n"), ("assistant", " spaced ")),
]


def spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of labelled positions."""
    out, start = [], None
    for i, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("loss_tokens", ["response", "answer"])
@pytest.mark.parametrize("record", CHATS)
def test_fast_path_agrees_with_the_per_prefix_oracle(record, loss_tokens, tokenizer):
    ex = normalise_record(record, "x", 0)
    turns = ex.messages + (("assistant", ex.response),)
    assert assistant_labels(turns, tokenizer, loss_tokens) == assistant_labels_reference(turns, tokenizer, loss_tokens)


@pytest.fixture(scope="module")
def merging_tokenizer():
    """A byte-level BPE with GPT-2's regex and merges ("\\n\\n", " s", "sp"), a chat template: tokens that merge
    inside a reply and across whitespace, unlike the micro tokenizer's one byte per token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ċ", "Ċ"), ("Ġ", "s"), ("s", "p"), ("Ġs", "p")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.mark.parametrize("record", CHATS)
def test_fast_path_agrees_with_the_oracle_on_a_merging_tokenizer(record, merging_tokenizer):
    ex = normalise_record(record, "x", 0)
    turns = ex.messages + (("assistant", ex.response),)
    for loss_tokens in ("response", "answer"):
        fast = assistant_labels(turns, merging_tokenizer, loss_tokens)
        assert fast == assistant_labels_reference(turns, merging_tokenizer, loss_tokens)


@pytest.mark.parametrize("record", CHATS)
def test_every_assistant_turn_and_nothing_else_is_labelled(record, tokenizer):
    ex = normalise_record(record, "x", 3)
    t = tokenize_example(ex, tokenizer, "chat", 512, assistant_turns="all")
    replies = [c for r, c in ex.messages if r == "assistant"] + [ex.response]
    runs = spans(t.labels)
    assert [tokenizer.decode(t.input_ids[a:b]) for a, b in runs] == [c + "<|im_end|>\n" for c in replies]
    assert all(t.labels[i] == t.input_ids[i] for a, b in runs for i in range(a, b))
    answer = tokenize_example(ex, tokenizer, "chat", 512, "answer", assistant_turns="all")
    assert [tokenizer.decode(answer.input_ids[a:b]) for a, b in spans(answer.labels)] == replies


@pytest.mark.parametrize("record", CHATS)
def test_last_turn_labels_are_those_of_assistant_turns_last(record, tokenizer):
    ex = normalise_record(record, "x", 0)
    last = tokenize_example(ex, tokenizer, "chat", 512)
    every = tokenize_example(ex, tokenizer, "chat", 512, assistant_turns="all")
    assert every.input_ids == last.input_ids
    start = spans(every.labels)[-1][0]
    assert every.labels[start:] == last.labels[start:] and set(last.labels[:start]) == {IGNORE_INDEX}


def test_single_turn_is_the_same_under_last_and_all(tokenizer):
    ex = normalise_record(chat(("system", "s"), ("user", "2+3?"), ("assistant", "5")), "x", 0)
    assert tokenize_example(ex, tokenizer, "chat", 64) == tokenize_example(ex, tokenizer, "chat", 64,
                                                                             assistant_turns="all")


def test_loss_is_the_mean_over_every_assistant_token(tokenizer):
    """l_n stays token-mean NLL over response tokens, now those of all turns: checked against a float64 loop."""
    toks = tokenize_examples([normalise_record(r, "x", i) for i, r in enumerate(CHATS)], tokenizer, "chat", 256,
                             assistant_turns="all")
    model = micro_llama(dtype=torch.float64)
    batch = collate(toks, tokenizer.pad_token_id)
    got = per_example_loss(model, batch)
    for row, t in enumerate(toks):
        ids = torch.tensor([t.input_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # [T, V]
        nll = [-logp[i - 1, t.input_ids[i]] for i in range(1, len(t.labels)) if t.labels[i] != IGNORE_INDEX]
        assert len(nll) == t.n_response_tokens - (t.labels[0] != IGNORE_INDEX)
        torch.testing.assert_close(got[row], torch.stack(nll).mean(), rtol=1e-10, atol=1e-12)


def test_eval_losses_cover_every_turn(tokenizer):
    """evaluate.losses_and_kl (left padding, last-K window) gives the same per-example losses as the training loss."""
    from dualsft.evaluation.evaluate import EvalConfig, losses_and_kl

    exs = [normalise_record(r, "x", i) for i, r in enumerate(CHATS)]
    model = micro_llama()  # float32: float64 eager attention gives NaN on left-padded rows (transformers' mask)
    loss, _ = losses_and_kl(model, tokenizer, exs, EvalConfig(assistant_turns="all", max_length=256, batch_size=3))
    toks = tokenize_examples(exs, tokenizer, "chat", 256, assistant_turns="all")
    with torch.no_grad():
        ref = per_example_loss(model, collate(toks, tokenizer.pad_token_id))
    torch.testing.assert_close(torch.tensor([loss[i] for i in range(3)]), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("roles, match", [
    (["user", "user", "assistant"], "alternating"),
    (["user", "assistant", "assistant"], "alternating"),
    (["assistant", "user", "assistant"], "alternating"),
    (["user", "system", "assistant"], "alternating"),
    (["system", "user"], "no assistant turn"),
    (["user", "assistant", "user"], "last message must be the assistant"),
    (["user", "tool", "assistant"], r"unsupported message role\(s\) \['tool'\]"),
])
def test_malformed_chats_are_refused_naming_the_record(roles, match):
    with pytest.raises(DataFormatError, match=f"f.jsonl:4: .*{match}"):
        normalise_record(chat(*[(r, "x") for r in roles]), "f.jsonl:4", 0)


def test_empty_assistant_turn_warns_with_indices_or_is_dropped(tokenizer, caplog):
    exs = [normalise_record(CHATS[0], "x", 0),
           normalise_record(chat(("user", "a"), ("assistant", "  "), ("user", "b"), ("assistant", "2")), "x", 1)]
    with caplog.at_level(logging.WARNING, logger="dualsft"):
        kept = tokenize_examples(exs, tokenizer, "chat", 128, source="pool p", assistant_turns="all")
    assert [t.index for t in kept] == [0, 1]
    assert "pool p: 1 example(s) have an empty or whitespace-only assistant turn (indices [1])" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dualsft"):
        assert len(tokenize_examples(exs, tokenizer, "chat", 128)) == 2  # only the last turn is trained: fine
    assert "empty" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="dualsft"):
        kept = tokenize_examples(exs, tokenizer, "chat", 128, drop_empty=True, assistant_turns="all")
    assert [t.index for t in kept] == [0] and "dropped 1 example(s) with an empty" in caplog.text


def test_all_turns_need_the_chat_template(tokenizer):
    with pytest.raises(ConfigError, match="--assistant-turns 'all': needs --template chat"):
        CommonConfig(template="plain", assistant_turns="all")
    ex = Example(0, (("user", "a"), ("assistant", "b"), ("user", "c")), "d")
    with pytest.raises(DataFormatError, match="needs --template chat"):
        tokenize_example(ex, tokenizer, "plain", 64, assistant_turns="all")


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    """A template that drops earlier replies' content (as reasoning templates do) has no per-turn labels."""
    import copy

    clone = copy.deepcopy(tokenizer)
    clone.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                           "{% if m['role'] == 'assistant' and not loop.last %}…{% else %}{{ m['content'] }}{% endif %}"
                           "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ex = normalise_record(CHATS[0], "x", 0)
    with pytest.raises(DataFormatError, match="use --assistant-turns last"):
        tokenize_example(ex, clone, "chat", 256, assistant_turns="all")


def test_a_tokenizer_without_offsets_uses_the_oracle(tokenizer):
    class Slow:  # a "slow" tokenizer: no offsets mapping
        is_fast = False

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, text, **kw):
            assert "return_offsets_mapping" not in kw
            return tokenizer(text, **kw)

    ex = normalise_record(CHATS[1], "x", 0)
    turns = ex.messages + (("assistant", ex.response),)
    assert assistant_labels(turns, Slow()) == assistant_labels(turns, tokenizer)
