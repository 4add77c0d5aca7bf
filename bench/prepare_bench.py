"""Data preparation at scale: throughput, peak memory, packing efficiency and rank balance.

    python bench/prepare_bench.py                       # 50k and 200k conversations, 2 workers
    python bench/prepare_bench.py --sizes 20000 100000 --num-proc 4

For each size it writes a synthetic ShareGPT-style JSONL file (human/gpt turns; a long-tailed
length distribution with many multi-thousand-token conversations), runs the real command
`python -m sft.prepare` on it in a child process, samples the memory of that process tree, and
prints conversations/s, tokens/s, peak RSS, packing efficiency at max_length 4096 and the
attention-cost imbalance between 8 ranks. The bundled byte-level tokenizer is used, so a token is
a character of ASCII text. Peak RSS is reported both as total resident memory and as the private
(anonymous) part: the memory-mapped Arrow pages that make up the rest are page cache the kernel
can drop, and they grow with whatever was read, not with what is held.
"""

from __future__ import annotations

import argparse
import json
import os
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
    cmd = [sys.executable, "-m", "sft.prepare", "model=tiny", "data=jsonl", f"data.path={data}",
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--global-batch", type=int, default=64, help="rows of max_length tokens per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where data and caches go (default: a temporary directory, removed)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
