"""Data formats: every schema, both templates, response-only labels, truncation, typed errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dualsft.data.formats import (
    batches,
    collate,
    load_examples,
    normalise_record,
    tokenize_example,
    tokenize_examples,
)
from dualsft.errors import DataFormatError, EmptyResponseError
from dualsft.losses import IGNORE_INDEX, per_example_loss
from dualsft.testing import micro_llama

RECORDS = {
    "instruction/response": {"instruction": "Add 2 and 3.", "response": "5"},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
    "prompt/completion": {"prompt": "2+3=", "completion": "5"},
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
                              {"role": "assistant", "content": "5"}]},
    "question/answer": {"question": "What is 2+3?", "answer": "5"},
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("schema", sorted(RECORDS))
@pytest.mark.parametrize("template", ["chat", "plain"])
def test_every_schema_labels_only_the_response(schema, template, tokenizer):
    ex = normalise_record(RECORDS[schema], "x", 7)
    assert ex.response == "5" and ex.index == 7
    t = tokenize_example(ex, tokenizer, template, max_length=512)
    resp = [tok for tok in t.labels if tok != IGNORE_INDEX]
    n_prompt = t.labels.index(resp[0])
    assert all(lab == IGNORE_INDEX for lab in t.labels[:n_prompt])
    # the response tokens are labelled with themselves and decode to the response (+ end marker)
    assert t.input_ids[n_prompt:] == resp
    assert tokenizer.decode(resp).startswith("5")
    # the prompt text (minus template decoration) is entirely in the masked part
    prompt_part = tokenizer.decode(t.input_ids[:n_prompt])
    assert ex.messages[-1][1] in prompt_part


def test_alpaca_input_is_appended_to_instruction():
    ex = normalise_record(RECORDS["alpaca"], "x", 0)
    assert ex.messages[-1] == ("user", "Add the numbers.\n2 3")


def test_plain_template_is_prompt_newline_response(tokenizer):
    ex = normalise_record(RECORDS["prompt/completion"], "x", 0)
    t = tokenize_example(ex, tokenizer, "plain", 512)
    assert tokenizer.decode(t.input_ids) == "2+3=\n5" + tokenizer.eos_token


def test_jsonl_and_json_read_with_stable_indices(tmp_path):
    rows = [RECORDS[k] for k in sorted(RECORDS)]
    a = load_examples(write_jsonl(tmp_path / "a.jsonl", rows))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    b = load_examples(tmp_path / "b.json")
    assert [e.index for e in a] == list(range(len(rows))) == [e.index for e in b]
    assert [e.response for e in a] == [e.response for e in b]


def test_own_index_field_survives_rereading(tmp_path):
    rows = [{**RECORDS["prompt/completion"], "index": i} for i in (40, 3, 17)]
    assert [e.index for e in load_examples(write_jsonl(tmp_path / "s.jsonl", rows))] == [40, 3, 17]
    # duplicates are not trusted as indices: fall back to positions
    dup = [{**RECORDS["prompt/completion"], "index": 1} for _ in range(2)]
    assert [e.index for e in load_examples(write_jsonl(tmp_path / "d.jsonl", dup))] == [0, 1]


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(RECORDS["prompt/completion"]) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: malformed JSON"):
        load_examples(p)


def test_missing_field_names_the_field_and_line(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [RECORDS["prompt/completion"], {"prompt": "hi"}])
    with pytest.raises(DataFormatError, match=r"m\.jsonl:2: .*'completion' is missing"):
        load_examples(p)


def test_unknown_schema_and_empty_file(tmp_path):
    with pytest.raises(DataFormatError, match="unknown schema"):
        load_examples(write_jsonl(tmp_path / "u.jsonl", [{"foo": 1}]))
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match="no examples"):
        load_examples(tmp_path / "e.jsonl")


def test_chat_without_final_assistant_turn_is_rejected():
    with pytest.raises(DataFormatError, match="last message"):
        normalise_record({"messages": [{"role": "user", "content": "hi"}]}, "f:3", 0)


def test_empty_response_rejected_with_indices_or_dropped(tokenizer, caplog):
    exs = [normalise_record({"prompt": "p" * n, "completion": "abc"}, "x", i) for i, n in enumerate([5, 60, 5])]
    with pytest.raises(EmptyResponseError) as ei:
        tokenize_examples(exs, tokenizer, "plain", max_length=30)
    assert ei.value.indices == [1]
    with caplog.at_level(logging.WARNING):
        kept = tokenize_examples(exs, tokenizer, "plain", max_length=30, drop_empty=True)
    assert [t.index for t in kept] == [0, 2] and "dropped 1" in caplog.text


def test_truncation_is_reported(tokenizer, caplog):
    exs = [normalise_record({"prompt": "p", "completion": "r" * n}, "x", i) for i, n in enumerate([3, 50])]
    with caplog.at_level(logging.INFO, logger="dualsft"):
        toks = tokenize_examples(exs, tokenizer, "plain", max_length=20)
    assert "1 of 2 examples truncated" in caplog.text
    assert [t.truncated for t in toks] == [False, True] and len(toks[1].input_ids) == 20


def test_collate_pads_without_changing_losses(tokenizer):
    exs = [normalise_record(RECORDS[k], "x", i) for i, k in enumerate(sorted(RECORDS))]
    toks = tokenize_examples(exs, tokenizer, "chat", 256)
    model = micro_llama(dtype=torch.float64)
    together = per_example_loss(model, collate(toks, tokenizer.pad_token_id))
    alone = torch.cat([per_example_loss(model, collate([t], tokenizer.pad_token_id)) for t in toks])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-12)
    b = batches(toks, 2, tokenizer.pad_token_id, sort_by_length=True)
    assert sorted(torch.cat([x["index"] for x in b]).tolist()) == list(range(len(toks)))


@settings(max_examples=40, deadline=None)
@given(prompt=st.text(min_size=1, max_size=40), response=st.text(min_size=1, max_size=40),
       template=st.sampled_from(["chat", "plain"]), max_length=st.integers(2, 120), index=st.integers(0, 10**6))
def test_property_labels_never_cover_prompt_tokens(prompt, response, template, max_length, index):
    from dualsft.testing import byte_tokenizer

    tok = _TOK.get("t") or _TOK.setdefault("t", byte_tokenizer())
    ex = normalise_record({"prompt": prompt, "completion": response}, "x", index)
    t = tokenize_example(ex, tok, template, max_length)
    full_prompt_ids = tok(_render_prompt(ex, tok, template), add_special_tokens=False)["input_ids"]
    n_prompt = min(len(full_prompt_ids), len(t.labels))
    assert t.index == index
    assert len(t.input_ids) == len(t.labels) <= max_length
    assert all(lab == IGNORE_INDEX for lab in t.labels[:n_prompt])
    assert all(lab == i for lab, i in zip(t.labels[n_prompt:], t.input_ids[n_prompt:]))


_TOK: dict = {}


def _render_prompt(ex, tok, template):
    from dualsft.data.formats import render

    return render(ex, tok, template)[0]
