"""Bad input: one clear message naming the file/line/key, a non-zero exit, and no damage to an existing run."""

from __future__ import annotations

import json

import pytest

from conftest import FAST_RUN, run_cli, snapshot

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
# An emoji cut in half: JSON escapes the lone surrogate as \ud83d, json.loads gives it back, UTF-8 has no form for it.
HALF_EMOJI = json.dumps({"messages": [{"role": "user", "content": "cut \ud83d here"}, {"role": "assistant", "content": "y"}]})


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _bad_model(d):
    (d / "model").mkdir(exist_ok=True)
    (d / "model" / "config.json").write_text('{"model_type": "llama", "hidden_size":')
    return d / "model"


CASES = {
    "malformed_json_line": (lambda d: [f"data.path={_jsonl(d / 'bad.jsonl', [json.dumps(GOOD), '{not json'])}"],
                            r"bad\.jsonl:2: malformed JSON"),
    "unknown_role": (lambda d: [f"data.path={_jsonl(d / 'r.jsonl', [json.dumps({'messages': [{'role': 'robot', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}]})])}"],
                     r"r\.jsonl:1: messages\[0\] has unknown role 'robot'"),
    "empty_assistant_turn": (lambda d: [f"data.path={_jsonl(d / 'e.jsonl', [json.dumps(GOOD), json.dumps({'messages': [{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': '  '}]})])}"],
                             r"e\.jsonl:2: messages\[1\] is an empty assistant turn"),
    "missing_assistant_turn": (lambda d: [f"data.path={_jsonl(d / 'm.jsonl', [json.dumps({'messages': [{'role': 'user', 'content': 'x'}]})])}"],
                               r"m\.jsonl:1: conversation has no assistant turn"),
    "wrong_field_names": (lambda d: [f"data.path={_jsonl(d / 'f.jsonl', [json.dumps({'question': 'a', 'answer': 'b'})])}"],
                          r"f\.jsonl:1: cannot tell the format from fields \['answer', 'question'\]"),
    "empty_file": (lambda d: [f"data.path={_jsonl(d / 'empty.jsonl', [])}"], r"empty\.jsonl: file is empty"),
    "missing_file": (lambda d: [f"data.path={d / 'nope.jsonl'}"], r"nope\.jsonl: no such file or directory"),
    "unknown_config_key": (lambda d: ["optim.lrr=0.1"], r"optim\.lrr"),
    "wrong_type": (lambda d: ["optim.lr=fast"], r"optim\.lr"),
    "unknown_group_choice": (lambda d: ["model=llama9"], r"model.*llama9"),
    "max_length_too_small": (lambda d: ["data=demo", "data.max_length=9"], r"no training example survives.*data\.max_length=9"),
    "batch_not_divisible": (lambda d: ["data=demo", "train.global_batch_size=10", "train.micro_batch_size=4"],
                            r"train\.global_batch_size=10 is not divisible by train\.micro_batch_size=4"),
    "conflicting_offload": (lambda d: ["data=demo", "parallelism.cpu_offload=true"], r"parallelism\.cpu_offload needs parallelism=fsdp or zero3"),
    "qlora_without_gpu": (lambda d: ["data=demo", "peft=qlora"], r"peft=qlora needs"),
    "unknown_record_field": (lambda d: [f"data.path={_jsonl(d / 'u.jsonl', [json.dumps(GOOD), json.dumps(dict(GOOD, weight=2))])}"],
                             r"u\.jsonl:2: unknown field\(s\) \['weight'\] for format messages"),
    "unknown_message_field": (lambda d: [f"data.path={_jsonl(d / 'n.jsonl', [json.dumps({'messages': [{'role': 'user', 'content': 'x', 'name': 'bob'}, {'role': 'assistant', 'content': 'y'}]})])}"],
                              r"n\.jsonl:1: messages\[0\] has unknown field\(s\) \['name'\]"),
    "openai_tool_calls": (lambda d: [f"data.path={_jsonl(d / 't.jsonl', [json.dumps({'messages': [{'role': 'user', 'content': 'weather?'}, {'role': 'assistant', 'content': '', 'tool_calls': [{'type': 'function', 'function': {'name': 'get', 'arguments': '{}'}}]}, {'role': 'tool', 'content': 'sunny', 'tool_call_id': 'c1'}, {'role': 'assistant', 'content': 'Sunny.'}]})])}"],
                          r"t\.jsonl:1: messages\[1\] has 'tool_calls': structured \(OpenAI-style\) tool calls are not supported"),
    "lone_surrogate": (lambda d: [f"data.path={_jsonl(d / 's.jsonl', [json.dumps(GOOD), HALF_EMOJI])}"],
                       r"s\.jsonl:2: messages\[0\]\.content: character 4 is a lone UTF-16 surrogate"),
    # Model files (checked by sft/model.py), in the same battery: one line, exit 2, nothing touched.
    "model_path_missing": (lambda d: ["data=demo", f"model.path={d / 'no-model'}"], r"model\.path=.*no-model: no such directory"),
    "model_config_corrupt": (lambda d: ["data=demo", f"model.path={_bad_model(d)}"], r"config\.json: not valid JSON"),
    "chat_template_missing": (lambda d: ["data=demo", f"model.chat_template={d / 'none.jinja'}"],
                              r"model\.chat_template=.*none\.jinja: no such file"),
    "lora_targets_match_nothing": (lambda d: ["data=demo", "peft=lora", "peft.target_modules=[nothing_here]"],
                                   r"peft\.target_modules: nothing_here match no linear layer"),
    "lora_rank_zero": (lambda d: ["data=demo", "peft=lora", "peft.r=0"], r"peft\.r=0: the LoRA rank must be a positive integer"),
    "max_length_above_positions": (lambda d: ["data=demo", "data.max_length=100000"],
                                   r"data\.max_length=100000 is above the model's max_position_embeddings"),
    "openai_tools_field": (lambda d: [f"data.path={_jsonl(d / 'tf.jsonl', [json.dumps(dict(GOOD, tools=[{'type': 'function'}]))])}"],
                           r"tf\.jsonl:1: field 'tools': structured \(OpenAI-style\) tool calls are not supported"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_message(case, tmp_path, existing_run):
    make_args, pattern = CASES[case]
    before = snapshot(existing_run)
    # data=jsonl: a user's own file, format detected.
    res = run_cli([*FAST_RUN, "data=jsonl", "data.max_length=256", *make_args(tmp_path), f"run.output_dir={existing_run}"], timeout=300)
    # Hydra rejects unknown keys and group choices itself (its one-line message, exit 1); everything else is ours: exit 2.
    assert res.returncode == (1 if case in ("unknown_config_key", "wrong_type", "unknown_group_choice") else 2), res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    import re

    assert re.search(pattern, res.stderr), res.stderr[-2000:]
    assert snapshot(existing_run) == before
