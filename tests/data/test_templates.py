"""The `release` template (the authors' tokenisation rule) and answer-only loss tokens."""

from __future__ import annotations

import pytest

from dualsft.data.formats import Example, tokenize_example, tokenize_examples
from dualsft.errors import DataFormatError
from dualsft.losses import IGNORE_INDEX


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE with GPT-2's pre-tokenisation regex and ONE merge, "\\n\\n" -> "ĊĊ": enough to show
    how a prompt ending in "\\n" tokenises differently alone and inside prompt + "\\n" + response."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ĊĊ"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def trained(tok, example, template, loss_tokens="response"):
    t = tokenize_example(example, tok, template, 64, loss_tokens)
    return [tok.convert_ids_to_tokens(i) for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE_INDEX]


def test_release_masks_the_prompt_by_its_own_tokenisation_and_adds_no_end_token(bpe_tokenizer):
    ends_in_newline = Example(0, (("user", "What is 2+3?\n"),), "5")
    # alone, "...?\n\n" ends in one merged "ĊĊ" token; inside "...?\n\n5" GPT-2's regex splits it into "Ċ","Ċ":
    # the release masks len(tokens of the prompt alone) tokens, so ONE "\n" of the prompt is trained
    assert trained(bpe_tokenizer, ends_in_newline, "release") == ["Ċ", "5"]
    plain = Example(1, (("user", "What is 2+3?"),), "5")
    assert trained(bpe_tokenizer, plain, "release") == ["5"]  # no EOS, no extra token otherwise
    assert trained(bpe_tokenizer, plain, "plain") == ["5", "<|endoftext|>"]


def test_answer_loss_tokens_drop_what_the_template_appends(bpe_tokenizer, tokenizer):
    ex = Example(0, (("user", "What is 2+3?"),), "15")
    assert trained(bpe_tokenizer, ex, "plain", "answer") == ["1", "5"]
    chat = [tokenizer.decode([i]) for i, lab in zip(*(lambda t: (t.input_ids, t.labels))(
        tokenize_example(ex, tokenizer, "chat", 128))) if lab != IGNORE_INDEX]
    answer = [tokenizer.decode([i]) for i, lab in zip(*(lambda t: (t.input_ids, t.labels))(
        tokenize_example(ex, tokenizer, "chat", 128, "answer"))) if lab != IGNORE_INDEX]
    assert "".join(chat).startswith("15<|im_end|>") and "".join(answer) == "15"


def test_answer_loss_tokens_refuse_an_empty_answer_and_unknown_modes(tokenizer):
    from dualsft.errors import EmptyResponseError

    with pytest.raises(EmptyResponseError):
        tokenize_examples([Example(0, (("user", "q"),), "")], tokenizer, "chat", 64, loss_tokens="answer")
    with pytest.raises(DataFormatError, match="loss tokens"):
        tokenize_example(Example(0, (("user", "q"),), "a"), tokenizer, "chat", 64, "everything")


def test_blank_responses_warn_with_indices_and_drop_empty_drops_them(tokenizer, caplog):
    import logging

    exs = [Example(0, (("user", "q0"),), "7"), Example(1, (("user", "q1"),), "  \n"), Example(2, (("user", "q2"),), "")]
    with caplog.at_level(logging.WARNING, logger="dualsft"):
        kept = tokenize_examples(exs[:2], tokenizer, "chat", 64, source="pool x.jsonl")
    assert [t.index for t in kept] == [0, 1]  # kept (the chat end tokens are its labels), but named
    assert "pool x.jsonl: 1 example(s) have an empty or whitespace-only response (indices [1])" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dualsft"):
        kept = tokenize_examples(exs, tokenizer, "chat", 64, drop_empty=True)
    assert [t.index for t in kept] == [0] and "dropped 2 example(s)" in caplog.text and "[1, 2]" in caplog.text
