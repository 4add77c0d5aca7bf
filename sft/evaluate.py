"""Held-out loss, and generated answers scored by exact match against the reference answers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sft import distributed as D
from sft.data import Split
from sft.errors import SFTError
from sft.loader import collate
from sft.packing import build_rows, plan_epoch
from sft.templating import IGNORE_INDEX


@dataclass
class EvalConfig:
    every: int = 50  # optimizer steps between evaluations (0: only at the end)
    micro_batch_size: int = 8
    generate: int = 4  # prompts whose generated answers are printed and scored at each evaluation
    prompts_file: Optional[str] = None  # JSONL of {"messages": [...], "answer": "..."}; default: eval split prompts
    score_prompts: int = 64  # prompts scored by exact match at the start and end of the run
    max_new_tokens: int = 32
    early_stopping_patience: int = 0  # stop after this many evaluations without a new best eval loss (0: never)
    # final/ holds the model of the best eval loss rather than the last step (always so with early
    # stopping). Each new best is checkpointed when it happens, and that checkpoint is never pruned.
    keep_best: bool = False


def tracks_best(cfg: EvalConfig) -> bool:
    """Whether final/ must be the best model: keep_best, or early stopping (whose last steps are worse)."""
    return cfg.keep_best or cfg.early_stopping_patience > 0


def eval_loss(engine, split: Split, cfg: EvalConfig, max_length: int, strategy: str, pad_id: int, varlen: bool) -> float:
    """Mean loss per target token over the whole eval split, the same on any number of ranks."""
    if len(split) == 0:
        return float("nan")
    lengths = split.lengths
    rows = build_rows(lengths, strategy, max_length)
    world = D.world_size()
    per_step = cfg.micro_batch_size * world
    plan = plan_epoch(rows, lengths, seed=0, epoch=0, global_rows=per_step, micro_rows=cfg.micro_batch_size)
    engine.module.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for s in range(len(plan.steps)):
            for mb_rows in plan.micro_batches(s, D.rank(), world):
                mb = collate(mb_rows, split, pad_id, varlen)
                total += float(engine.loss_sum(mb))  # the engine's compute dtype; same calls on every rank
                count += mb.num_target
    engine.module.train()
    total, count = D.all_reduce_sum([total, count])
    return total / max(count, 1.0)


@dataclass
class Prompt:
    ids: list[int]
    answer: str


def load_prompts(cfg: EvalConfig, split: Split, tokenizer, limit: int) -> list[Prompt]:
    """Up to `limit` prompts with their reference answers: from eval.prompts_file (the demo's), or else from the
    eval split itself -- each chosen conversation cut before its first trained token, the answer being that
    trained turn. The eval split is sampled evenly, not from its head, so every source of a mixture shows."""
    if cfg.prompts_file:
        return _prompts_from_file(Path(cfg.prompts_file), tokenizer, limit)
    prompts = []
    for i in _spread(len(split), limit):
        ids, labels = split.example(i)
        trained = np.flatnonzero(labels != IGNORE_INDEX)
        if len(trained) == 0:
            continue
        first = int(trained[0])
        end = first
        while end < len(labels) and labels[end] != IGNORE_INDEX:
            end += 1
        answer = tokenizer.decode(ids[first:end], skip_special_tokens=True)
        prompts.append(Prompt(ids[:first].tolist(), answer))
    return prompts


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n); deterministic."""
    if k >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, num=max(k, 0))})


def _prompts_from_file(path: Path, tokenizer, limit: int) -> list[Prompt]:
    prompts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SFTError(f"eval.prompts_file={path}: cannot be read ({exc.strerror}); give a JSONL file or eval.prompts_file=null") from None
    for lineno, line in enumerate(lines, 1):
        if len(prompts) == limit:
            break
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            messages, answer = rec["messages"], rec["answer"]
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise SFTError(f"{path}:{lineno}: expected {{\"messages\": [...], \"answer\": \"...\"}} ({exc})") from None
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        prompts.append(Prompt(list(ids), answer))
    return prompts


def generate_answers(lm, tokenizer, prompts: list[Prompt], max_new_tokens: int, eot_id: int, device) -> list[str]:
    """Greedy answers, one prompt at a time (no padding, so nothing depends on the batch)."""
    answers = []
    was_training = lm.training
    lm.eval()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p.ids], device=device)
            out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=[eot_id, tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, use_cache=True)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    lm.train(was_training)
    return answers


def exact_match(prompts: list[Prompt], answers: list[str]) -> float:
    if not prompts:
        return float("nan")
    return sum(a.strip() == p.answer.strip() for p, a in zip(prompts, answers)) / len(prompts)
