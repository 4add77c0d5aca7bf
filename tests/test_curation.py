"""Each curation filter on hand-made conversations: what it drops, what it keeps, how it is counted."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from data_helpers import chat, data_config, write_jsonl

from sft import curation
from sft.curation import FilterConfig, is_cut_off, repetition_ratio
from sft.data import prepare_data
from sft.errors import SFTError

PROSE = ("The committee met on Tuesday to review the budget for the coming year and agreed that the new library "
         "should open in the spring, provided the contractors finish the roof before the rains arrive. Several "
         "members asked for a detailed schedule, and the treasurer promised to circulate one by Friday so that "
         "everyone could comment before the next meeting, which will take place in the old town hall.")


def prepared(tmp_path, records, **filters):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = data_config(tmp_path, path, max_length=1024)
    cfg = replace(cfg, filters=replace(FilterConfig(), **filters))
    return prepare_data(cfg, _tokenizer(), None, None)


def _tokenizer():
    from transformers import AutoTokenizer

    from conftest import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def kept_ids(data, records) -> list[str]:
    return sorted(records[int(r)]["id"] for r in data.train.rows)


def tagged(records):
    return [dict(r, id=f"r{i}") for i, r in enumerate(records)]


def test_by_default_only_what_correctness_needs_is_dropped(tmp_path):
    records = tagged([
        chat("Tell me about the meeting.", PROSE),
        chat("Tell me about the meeting.", PROSE),  # duplicate
        chat("Help?", "I'm sorry, but I can't help with that."),  # refusal
        chat("Loop?", "again and again " * 40),  # degenerate
        chat("Story?", PROSE[:150]),  # cut off
        chat("x" * 1100, "Too long for a row."),  # overlong
    ])
    data = prepared(tmp_path, records)
    assert kept_ids(data, records) == ["r0", "r1", "r2", "r3", "r4"]
    assert data.manifest["sources"][0]["dropped"] == {"overlong": 1}
    example = data.manifest["filters"]["overlong"]["examples"][0]
    assert example["where"].endswith("d.jsonl:6") and "> data.max_length=1024" in example["why"]


def test_overlong_truncation_can_leave_nothing_to_train(tmp_path):
    records = tagged([chat("x" * 400, "Cut away."), chat("y" * 150, "z" * 200), chat("Short?", "Kept whole.")])
    path = write_jsonl(tmp_path / "d.jsonl", records)
    data = prepare_data(data_config(tmp_path, path, overlong="truncate"), _tokenizer(), None, None)
    assert kept_ids(data, records) == ["r1", "r2"]
    src = data.manifest["sources"][0]
    assert src["dropped"] == {"no_target": 1} and src["truncated"] == 1
    assert data.train.lengths.max() == 256


@pytest.mark.parametrize("bound, dropped", [
    ({"min_prompt_tokens": 40}, "r0"),  # prompt "hi": ~22 template tokens
    ({"max_prompt_tokens": 100}, "r1"),  # a 120-character prompt
    ({"min_response_tokens": 10}, "r2"),  # answer "ok" + end-of-turn
    ({"max_response_tokens": 100}, "r3"),  # a 200-character answer
])
def test_token_length_bounds_for_prompt_and_response(tmp_path, bound, dropped):
    records = tagged([chat("hi", "a" * 50), chat("b" * 120, "c" * 50), chat("d" * 30, "ok"), chat("e" * 30, "f" * 200)])
    data = prepared(tmp_path, records, **bound)
    assert kept_ids(data, records) == sorted({"r0", "r1", "r2", "r3"} - {dropped})
    which = "prompt_length" if "prompt" in next(iter(bound)) else "response_length"
    assert data.manifest["sources"][0]["dropped"] == {which: 1}
    assert data.manifest["filters"][which]["examples"][0]["where"].endswith(f"d.jsonl:{int(dropped[1:]) + 1}")


def test_exact_duplicates_keep_the_first_copy(tmp_path):
    records = tagged([
        chat("What is the plan?", PROSE),
        chat("Something else?", "Different answer."),
        chat("What  is the plan?", PROSE.replace(". ", ".  ")),  # same text once whitespace is normalised
        chat("What is the plan?", PROSE, system="Be formal."),  # another system prompt: another conversation
        chat("What is the plan?", PROSE),
    ])
    data = prepared(tmp_path, records, exact_dedup=True)
    assert kept_ids(data, records) == ["r0", "r1", "r3"]
    report = data.manifest["filters"]["exact_duplicate"]
    assert report["count"] == 2 and report["examples"][0]["why"].endswith("d.jsonl:1")


def test_near_duplicates_are_found_with_minhash_lsh(tmp_path):
    words = PROSE.split()
    long = PROSE + " " + " ".join(reversed(words))  # ~120 words
    edited = long.replace("library", "museum", 1)  # one word changed: ~5 of ~120 word 5-grams differ
    records = tagged([
        chat("Summarise the meeting.", long),
        chat("Summarise the meeting.", edited),
        chat("Summarise the meeting.", PROSE),  # half of the text: similar, not a near-duplicate
        chat("Unrelated?", "The tide tables for next month show unusually low water on the third and fourth days."),
    ])
    data = prepared(tmp_path, records, near_dedup=True, near_dedup_threshold=0.85)
    assert kept_ids(data, records) == ["r0", "r2", "r3"]
    assert data.manifest["filters"]["near_duplicate"]["examples"][0]["why"] == f"near-duplicate of {tmp_path / 'd.jsonl'}:1"


def test_degenerate_repetition(tmp_path):
    records = tagged([chat("Loop?", "I will try again. " * 30), chat("Prose?", PROSE), chat("Short?", "Yes yes yes.")])
    data = prepared(tmp_path, records, max_repetition=0.5)
    assert kept_ids(data, records) == ["r1", "r2"]
    assert repetition_ratio("I will try again. " * 30, 3) > 0.9 and repetition_ratio(PROSE, 3) < 0.05


def test_answers_cut_off_mid_sentence(tmp_path):
    records = tagged([
        chat("Story?", PROSE[:150]),  # stops mid-sentence
        chat("Code?", "Here it is:\n```python\nprint('hi')"),  # unclosed code block
        chat("Story?", PROSE),
        chat("Capital?", "Paris"),  # short answers need no full stop
        chat("List?", "- apples\n- pears"),
    ])
    data = prepared(tmp_path, records, drop_cutoff=True)
    assert kept_ids(data, records) == ["r2", "r3", "r4"]
    assert "mid-sentence" in data.manifest["filters"]["cutoff"]["examples"][0]["why"]
    assert is_cut_off("It ends with a comma,") and not is_cut_off("It ends well.")


@pytest.mark.parametrize("mode", ["flag", "drop"])
def test_refusals_are_flagged_or_dropped(tmp_path, mode):
    records = tagged([
        chat("Do it.", "I'm sorry, but I can't help with that."),
        chat("Explain.", "As an AI language model, I have no opinions."),
        chat("Explain.", "Sure: the answer is four."),
    ])
    data = prepared(tmp_path, records, refusals=mode)
    src = data.manifest["sources"][0]
    assert src["flagged_refusals"] == 2
    assert kept_ids(data, records) == (["r0", "r1", "r2"] if mode == "flag" else ["r2"])
    assert data.manifest["filters"]["refusal_flagged"]["count"] == 2
    assert ("refusal" in data.manifest["filters"]) == (mode == "drop")


def test_each_drop_is_counted_once_against_the_first_filter(tmp_path):
    refusal = "I'm sorry, but I can't help with that. " * 8
    records = tagged([chat("a", refusal), chat("a", refusal), chat("b", PROSE)])
    data = prepared(tmp_path, records, refusals="drop", max_repetition=0.5, exact_dedup=True)
    assert kept_ids(data, records) == ["r2"]
    assert data.manifest["sources"][0]["dropped"] == {"repetition": 2}  # repetition comes before refusal and duplicates
    assert data.manifest["train"]["dropped"] == {"repetition": 2}


def test_dropped_examples_in_the_manifest_are_capped(tmp_path):
    records = tagged([chat("same?", "Same answer.")] * 10)
    data = prepared(tmp_path, records, exact_dedup=True, examples=2)
    report = data.manifest["filters"]["exact_duplicate"]
    assert report["count"] == 9 and len(report["examples"]) == 2


@pytest.mark.parametrize("exact_dedup", [False, True])
def test_training_copies_of_eval_examples_are_always_removed(exact_dedup):
    n = 6
    cols = {
        "num_tokens": np.full(n, 50), "num_target": np.full(n, 10), "prompt_tokens": np.full(n, 40),
        "overlong": np.zeros(n, bool), "content_hash": np.array([7, 7, 8, 9, 9, 7]), "repetition": np.zeros(n),
        "cutoff": np.zeros(n, bool), "refusal": np.zeros(n, bool),
    }
    eval_rows, train_rows = np.array([5]), np.array([0, 1, 2, 3, 4])
    d = curation.decide(cols, train_rows, eval_rows, FilterConfig(exact_dedup=exact_dedup), 256)
    copy, dup = curation.FILTERS.index("eval_copy"), curation.FILTERS.index("exact_duplicate")
    # rows 0 and 1 copy eval row 5 (removed whatever the settings); row 4 copies training row 3.
    assert d.reason.tolist() == [copy, copy, -1, -1, dup if exact_dedup else -1, -1]
    assert d.duplicate_of[0] == 5 and d.duplicate_of[1] == 5


def test_filter_settings_are_checked():
    with pytest.raises(SFTError, match="refusals"):
        curation.validate_filter_config(FilterConfig(refusals="maybe"))
    with pytest.raises(SFTError, match="not a valid regular expression"):
        curation.validate_filter_config(FilterConfig(refusal_patterns=["(unclosed"]))
    with pytest.raises(SFTError, match="max_repetition"):
        curation.validate_filter_config(FilterConfig(max_repetition=1.5))
