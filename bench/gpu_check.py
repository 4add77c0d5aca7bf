"""One command that checks `sft` on the first GPU the project gets: correctness, speed, memory, export.

    python bench/gpu_check.py                       # on one GPU: ~1.2B Llama-3-shaped model, bf16, ~4-5 minutes
    python bench/gpu_check.py --tiny --out /tmp/gc  # the CPU rehearsal (toy model, same recipe, under 2 minutes)

GPU time is rare and short (one H100/H200 for ~15 minutes, no network), so this needs nothing the
lent machines lack (torch, transformers, peft, accelerate; no Hydra, omegaconf, datasets, deepspeed
or flash-attn) and never touches the network: the model is built from config values once and saved as
the local checkpoint (model.path) every check loads; the tokenizer and data are the ones shipped in
sft/assets. Checks (bench/gpu_check_checks.py):

  packed_vs_unpacked.*   per-document loss and gradient cosine, packed rows vs one document per row, through
                         sft.loader.collate and sft.loss.ChunkedLossLM; fp32 tight, bf16 against measured bf16 error
  probe.<backend>        sft.loss.check_document_isolation on sdpa, flex_attention, flash_attention_2 (if importable)
  <engine>_<full|lora>.* tokens/s, MFU (sft.flops) and peak memory at max_length 4096 with per-layer activation
                         checkpointing: single GPU, and FSDP2 on a 1-process group with the GPU mixed precision
  plan.*                 measured peak memory against sft-plan's prediction (sft.memory.plan_memory; skipped if absent)
  curve.loss_falls       20 optimizer steps on the demo conversations; loss must fall
  export.*               final/ written by sft.export, loaded by from_pretrained, equal weights, generates
  runner.total_time      the whole run within 8 minutes (the rehearsal: within 2 minutes of CPU time)

Each check has a time budget (SIGALRM ends it with a FAIL row); the run stops cleanly at 9 minutes
(tiny: 5.5, for loaded CI machines) whatever is running, and gpu_check.json + gpu_check.md in --out are rewritten after every
check, so a run cut short still leaves its table. Exit status: 0 if nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `sft` from this checkout; nothing to install
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check_setup as S  # noqa: E402
from gpu_check_setup import row  # noqa: E402


class CheckTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise CheckTimeout()


class Report:
    def __init__(self, out: Path, facts: dict, vers: dict, scale: S.Scale):
        self.out = out
        self.doc = {"device": facts, "versions": vers, "mode": "tiny" if scale.tiny else "gpu", "checks": [], "elapsed_s": 0.0}
        self.start = time.monotonic()
        self.lock = threading.Lock()
        out.mkdir(parents=True, exist_ok=True)

    def add(self, r: dict) -> None:
        with self.lock:
            self.doc["checks"].append(r)
        print(format_line(r), flush=True)

    def write(self, note: str | None = None) -> None:
        with self.lock:
            self.doc["elapsed_s"] = round(time.monotonic() - self.start, 1)
            if note:
                self.doc["stopped"] = note
            tmp = self.out / ".gpu_check.json.tmp"
            tmp.write_text(json.dumps(self.doc, indent=2, default=str))
            os.replace(tmp, self.out / "gpu_check.json")
            (self.out / "gpu_check.md").write_text(markdown(self.doc))


def _status(ok) -> str:
    return {True: "PASS", False: "FAIL", None: "SKIP"}[ok]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def format_line(r: dict) -> str:
    return f"{_status(r['pass']):4}  {r['name']:<32} {_fmt(r['value']):>12} {r['unit']:<10} {r['detail']}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(doc: dict) -> str:
    d, v = doc["device"], doc["versions"]
    head = [f"Device: {d.get('name')} ({d.get('type')}" + (f", {d.get('memory_gib')} GiB, driver {d.get('driver')}, CUDA {d.get('cuda')}"
                                                          if d.get("type") == "cuda" else "") + ")",
            "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
            f"Mode: {doc['mode']}; elapsed {doc['elapsed_s']} s" + (f"; stopped: {doc['stopped']}" if doc.get("stopped") else ""),
            "", "| check | result | value | unit | detail |", "| --- | --- | --- | --- | --- |"]
    lines = [f"| {r['name']} | {_status(r['pass'])} | {_fmt(r['value'])} | {r['unit']} | {_cell(r['detail'])} |"
             for r in doc["checks"]]
    return "\n".join(head + lines) + "\n"


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_check(report: Report, scale: S.Scale, name: str, budget_s: float, fn, *args) -> list[dict]:
    """Run one check under its time budget; an exception or a timeout becomes a FAIL row, never a crash."""
    left = scale.hard_stop_s - (time.monotonic() - report.start) - 5.0
    if left < 5.0:
        rows = [row(name, False, None, "", f"not run: the {scale.hard_stop_s:.0f} s limit of the whole run was reached")]
    else:
        budget = min(budget_s, left)
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, budget)
        t = time.monotonic()
        try:
            rows = fn(*args)
        except CheckTimeout:
            rows = [row(name, False, None, "", f"timed out after {budget:.0f} s (its budget)")]
        except Exception as exc:  # noqa: BLE001 - the report must say what failed and go on
            where = traceback.extract_tb(exc.__traceback__)[-1]
            rows = [row(name, False, None, "", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''} "
                                               f"({Path(where.filename).name}:{where.lineno})")]
            traceback.print_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for r in rows:
            r.setdefault("detail", "")
        print(f"      ({name}: {time.monotonic() - t:.1f} s)", flush=True)
    for r in rows:
        report.add(r)
    report.write()
    try:
        free_memory()
    except Exception:  # noqa: BLE001 - a broken CUDA context is already reported by the failing check
        pass
    return rows


def total_time_row(report: Report, scale: S.Scale) -> dict:
    """The whole run against its budget: wall time on the GPU; CPU time in the rehearsal, whose wall time on a
    shared CI machine measures the machine's load rather than this script."""
    import resource

    wall = time.monotonic() - report.start
    if not scale.tiny:
        return row("runner.total_time", wall <= scale.total_budget_s, round(wall, 1), "s",
                   f"all checks, after imports; budget {scale.total_budget_s:.0f} s, hard stop {scale.hard_stop_s:.0f} s")
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return row("runner.total_time", cpu <= scale.total_budget_s, round(cpu, 1), "CPU s",
               f"CPU time of the rehearsal including imports (budget {scale.total_budget_s:.0f} s); wall {wall:.0f} s after imports")


def _watchdog(report: Report, scale: S.Scale) -> None:
    """The last resort: a check stuck inside a C call (a hung collective, a kernel) cannot see SIGALRM."""

    def fire():
        report.add(row("runner.hard_stop", False, round(time.monotonic() - report.start, 1), "s",
                       f"stopped at the {scale.hard_stop_s:.0f} s limit while a check was still running"))
        report.write(note=f"hard stop at {scale.hard_stop_s:.0f} s")
        os._exit(3)

    timer = threading.Timer(scale.hard_stop_s + 10.0, fire)
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy model on CPU (the rehearsal the test suite runs)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check"), help="where gpu_check.json and gpu_check.md go")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for the exported model (default: a temp dir)")
    ap.add_argument("--only", default="", help="comma-separated check groups to run (default: all)")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network, even by accident
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    import gpu_check_checks as K

    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA device; run with --tiny for the CPU rehearsal", file=sys.stderr)
        return 2
    scale = S.tiny_scale() if args.tiny else S.gpu_scale()
    if args.tiny:
        # The toy model's matrices are too small to share among threads, and on a busy CI machine OpenMP's
        # spinning threads make every step 10-40x slower (measured: 5 steps in 0.5 s on 1 thread, 22 s on 2).
        torch.set_num_threads(1)
    dev = torch.device("cpu") if args.tiny else S.device()
    report = Report(args.out, S.device_facts(dev), S.versions(), scale)
    report.write()
    _watchdog(report, scale)
    torch.manual_seed(0)
    print(f"gpu_check: {report.doc['device'].get('name')} ({dev}), mode {report.doc['mode']}, out {args.out}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-", dir=args.work) as work:
        ctx = K.Context(scale=scale, device=dev, work=Path(work), out=args.out)
        only = {g for g in args.only.split(",") if g}
        known = [name for name, _, _ in K.plan_of_checks(ctx)]
        if only - set(known):
            print(f"error: --only {','.join(sorted(only - set(known)))}: not a check; choose from {', '.join(known)}", file=sys.stderr)
            return 2
        for group, budget, fn in K.plan_of_checks(ctx):
            if only and group not in only:
                continue
            run_check(report, scale, group, budget, fn, ctx)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # the 1-process group of the FSDP2 checks
        dist.destroy_process_group()
    report.add(total_time_row(report, scale))
    failed = [r["name"] for r in report.doc["checks"] if r["pass"] is False]
    report.write()
    print(f"gpu_check: {len(report.doc['checks'])} checks, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else "")
          + f"; {report.doc['elapsed_s']} s; report in {args.out}/gpu_check.md", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
