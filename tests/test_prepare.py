"""The data cache and `python -m sft.prepare`: hits, misses, refusals, concurrent builders, bad input."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from data_helpers import chat, data_config, numbered_chats, write_jsonl

from conftest import REPO, TOKENIZER_DIR
from sft import cache
from sft.data import prepare_data
from sft.errors import SFTError
from sft.sources import Record
from sft.templating import resolve_eot_id, tokenize_conversation


@pytest.fixture
def chats(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", numbered_chats(60))


def fresh_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def build_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_identical_config_hits_the_cache(tmp_path, chats, tokenizer):
    cfg = data_config(tmp_path, chats)
    first = prepare_data(cfg, tokenizer, None, None)
    second = prepare_data(replace(cfg, num_proc=2), tokenizer, None, None)  # how fast is not what
    assert first.built and not second.built
    assert first.path == second.path and first.manifest["key"] == second.manifest["key"]
    moved = write_jsonl(tmp_path / "elsewhere" / "d.jsonl", numbered_chats(60))  # same bytes, other place
    assert prepare_data(replace(cfg, path=str(moved)), tokenizer, None, None).path == first.path


@pytest.mark.parametrize("change", ["tokenizer", "template", "eot", "data", "max_length", "filter", "system_prompt", "split"])
def test_any_change_to_what_decides_the_tokens_rebuilds(tmp_path, chats, tokenizer, change):
    cfg = data_config(tmp_path, chats)
    base = prepare_data(cfg, tokenizer, None, None)
    tok, eot = tokenizer, None
    if change == "tokenizer":
        tok = fresh_tokenizer()
        tok.add_tokens(["<|extra|>"])
    elif change == "template":
        tok = copy.deepcopy(tokenizer)
        tok.chat_template = tokenizer.chat_template + "{# v2: renders the same, but is another template #}"
    elif change == "eot":
        tok = copy.deepcopy(tokenizer)
        tok.chat_template = (TOKENIZER_DIR / "llama3_template.jinja").read_text()
        eot = "<|eot_id|>"
    elif change == "data":
        write_jsonl(chats, numbered_chats(60) + [chat("one more?", "Yes.")])
    elif change == "max_length":
        cfg = replace(cfg, max_length=128)
    elif change == "filter":
        cfg = replace(cfg, filters=replace(cfg.filters, exact_dedup=True))
    elif change == "system_prompt":
        cfg = replace(cfg, system_prompt="Be brief.")
    elif change == "split":
        cfg = replace(cfg, eval_fraction=0.1)
    other = prepare_data(cfg, tok, None, eot)
    assert other.built and other.path != base.path
    assert len(build_dirs(tmp_path / "cache")) == 2


def test_a_cache_built_for_another_config_is_refused(tmp_path, chats, tokenizer):
    cfg = data_config(tmp_path, chats)
    built = prepare_data(cfg, tokenizer, None, None)
    with pytest.raises(SFTError, match="built for another config.*data preprocessing settings"):
        prepare_data(replace(cfg, max_length=128, prepared=built.path), tokenizer, None, None)
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (TOKENIZER_DIR / "llama3_template.jinja").read_text()
    with pytest.raises(SFTError, match="differs in: chat template"):
        prepare_data(replace(cfg, prepared=built.path), tok, None, "<|eot_id|>")
    assert prepare_data(replace(cfg, prepared=built.path), tokenizer, None, None).path == built.path  # the match is used
    # A cache directory whose manifest names another key (damaged or copied by hand) is refused too.
    manifest = json.loads((Path(built.path) / "manifest.json").read_text())
    manifest["key"] = "0" * 20
    (Path(built.path) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SFTError, match="built for another config"):
        prepare_data(cfg, tokenizer, None, None)
    with pytest.raises(SFTError, match="not a prepared data cache"):
        prepare_data(replace(cfg, prepared=str(tmp_path)), tokenizer, None, None)


BUILDER = """
import json, os, sys, time
from pathlib import Path
from transformers import AutoTokenizer
from sft.data import DataConfig, prepare_data
work = Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[2])
(work / f"ready-{sys.argv[3]}").touch()
while not (work / "go").exists():
    time.sleep(0.01)
cfg = DataConfig(path=str(work / "d.jsonl"), cache_dir=str(work / "cache"), max_length=256, eval_fraction=0.05, num_proc=2)
d = prepare_data(cfg, tok, None, None)
print(json.dumps({"built": d.built, "path": d.path, "train": len(d.train), "eval": len(d.eval)}))
"""


def test_two_concurrent_builders_make_one_valid_cache(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", numbered_chats(1500))
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(tmp_path), str(TOKENIZER_DIR), str(i)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    (tmp_path / "go").touch()  # both start building at the same moment
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["built"] for r in results) == [False, True]  # one built, the other waited for it
    assert results[0]["path"] == results[1]["path"]
    assert results[0]["train"] == results[1]["train"] and results[0]["train"] + results[0]["eval"] == 1500
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [e for e in entries if not e.startswith(".")] == [Path(results[0]["path"]).name]
    assert not [e for e in entries if "-build-" in e]  # no half-built leftovers


def test_a_late_finished_build_never_replaces_a_published_one(tmp_path):
    # Without working file locks two builders can both finish: the rename keeps the first.
    final = tmp_path / "key"
    for name in ("first", "second"):
        tmp = tmp_path / f".key-build-{name}"
        tmp.mkdir()
        (tmp / "payload").write_text(name)
        cache.write_manifest(tmp, {"key": "key"})
        cache.publish(tmp, final)
    assert (final / "payload").read_text() == "first"


def test_tokens_in_the_cache_are_what_the_template_gives(tmp_path, tokenizer):
    chats = write_jsonl(tmp_path / "d.jsonl", numbered_chats(150))  # > one worker batch: both workers tokenise
    records = [json.loads(line) for line in chats.read_text().splitlines()]
    for num_proc in (1, 2):
        cfg = data_config(tmp_path / f"p{num_proc}", chats, eval_fraction=0.1, num_proc=num_proc)
        data = prepare_data(cfg, tokenizer, None, None)
        eot = resolve_eot_id(tokenizer, None)
        for split in (data.train, data.eval):
            for i in range(len(split)):
                rec = Record(messages=tuple(records[int(split.rows[i])]["messages"]), where="-")
                ids, labels = split.example(i)
                want_ids, want_labels = tokenize_conversation(rec, tokenizer, eot, None)
                assert ids.tolist() == want_ids and labels.tolist() == want_labels
        assert sorted(np.concatenate([data.train.rows, data.eval.rows]).tolist()) == list(range(150))
        assert data.train.lengths.dtype == np.int64 and len(data.train.lengths) == len(data.train)


BAD_INPUTS = {
    "malformed_json": (['{"messages": [}'], r"d\.jsonl:2: malformed JSON"),
    "unknown_role": ([{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
                     r"d\.jsonl:2: messages\[0\] has unknown role 'robot'"),
    "empty_assistant": ([chat("hi", "  ")], r"d\.jsonl:2: messages\[1\] is an empty assistant turn"),
    "missing_assistant": ([{"messages": [{"role": "user", "content": "hi"}]}], r"d\.jsonl:2: conversation has no assistant turn"),
    "wrong_fields": ([{"question": "hi", "answer": "x"}], r"d\.jsonl:2: cannot tell the format from fields \['answer', 'question'\]"),
    "wrong_message_fields": ([{"messages": [{"speaker": "user", "text": "hi"}]}],
                             r"d\.jsonl:2: messages\[0\] has unknown field\(s\) \['speaker', 'text'\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_error_naming_file_and_line(tmp_path, tokenizer, case):
    lines, message = BAD_INPUTS[case]
    path = write_jsonl(tmp_path / "d.jsonl", [chat("fine", "Fine.")] + lines + [chat("also fine", "Yes.")])
    with pytest.raises(SFTError, match=message):
        prepare_data(data_config(tmp_path, path, num_proc=2), tokenizer, None, None)
    assert build_dirs(tmp_path / "cache") == []  # nothing half-built left behind
    assert not list((tmp_path / "cache").glob(".*-build-*"))


def test_empty_and_missing_files_are_named(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SFTError, match=r"empty\.jsonl: file is empty"):
        prepare_data(data_config(tmp_path, empty), tokenizer, None, None)
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(SFTError, match=r"blank\.jsonl: file holds no records"):
        prepare_data(data_config(tmp_path, blank), tokenizer, None, None)
    with pytest.raises(SFTError, match=r"nope\.jsonl: no such file or directory"):
        prepare_data(data_config(tmp_path, tmp_path / "nope.jsonl"), tokenizer, None, None)


def test_a_template_problem_found_in_a_worker_is_reported_with_its_line(tmp_path, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"  # no end-of-turn token
    path = write_jsonl(tmp_path / "d.jsonl", numbered_chats(200))
    with pytest.raises(SFTError, match=r"d\.jsonl:\d+: an assistant turn does not end with the end-of-turn token"):
        prepare_data(data_config(tmp_path, path, num_proc=2), tok, None, None)


def run_prepare(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "sft.prepare", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **env))


def test_prepare_cli_builds_then_reuses_and_prints_the_figures(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", numbered_chats(300) + numbered_chats(1))  # one exact duplicate
    args = ["data=jsonl", f"data.path={path}", "data.max_length=128", "data.num_proc=2", "data.filters.exact_dedup=true",
            "data.eval_fraction=0", "train.global_batch_size=8", "train.micro_batch_size=2", "--world", "2"]
    env = {"SFT_CACHE": str(tmp_path / "c")}
    first = run_prepare(args, env, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    assert "built in" in out and "conversations/s" in out and "tokens/s" in out
    assert "exact_duplicate: 1 dropped" in out
    assert "efficiency" in out and "world 2: attention-cost imbalance between ranks" in out
    key_dir = Path(out.splitlines()[0].split()[2])
    manifest = json.loads((key_dir / "manifest.json").read_text())
    assert manifest["sources"][0]["dropped"] == {"exact_duplicate": 1} and manifest["train"]["examples"] == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "d.jsonl"]  # no run directory, no Hydra output
    second = run_prepare(args, env, tmp_path)
    assert second.returncode == 0 and "already built: reused" in second.stdout
    assert second.stdout.splitlines()[0].split()[2] == str(key_dir)


def test_prepare_cli_reports_bad_data_before_any_work(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("a", "b"), chat("c", "d"), "{oops"])
    result = run_prepare(["data=jsonl", f"data.path={path}"], {"SFT_CACHE": str(tmp_path / "c")}, tmp_path)
    assert result.returncode == 2
    assert f"error: {path}:3: malformed JSON" in result.stderr
    assert "Traceback" not in result.stderr
