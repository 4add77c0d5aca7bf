"""`python -m sft.prepare`: build (or find) the data cache for a run's config and print what is in it.

The same Hydra config as `sft.train`, so `sft-prepare ARGS` followed by `sft-train ARGS` reuses the
cache (its key covers the sources, tokenizer, template and data settings, not the model or the
optimizer). A CPU job: run it on a login or CPU node, or as a Slurm array task per dataset, with
data.num_proc set to the cores available. `--world N` sets the world size that the rank
imbalance is reported for (default: WORLD_SIZE from the launcher, else 8).
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from sft import config as C
from sft.data import PreparedData, prepare_data, validate_data_config
from sft.errors import SFTError
from sft.packing import build_rows, microstep_imbalance, packing_efficiency, plan_epoch, rank_imbalance

log = logging.getLogger("sft")


def plan_figures(lengths, strategy: str, max_length: int, seed: int, global_rows: int, micro_rows: int, world: int) -> dict:
    """Packing efficiency of the rows and the balance of epoch 0's plan between `world` ranks."""
    rows = build_rows(lengths, strategy, max_length)
    fig = {"rows": len(rows), "efficiency": packing_efficiency(rows, lengths, max_length),
           "steps": -(-len(rows) // global_rows), "world": world}
    slots = global_rows // micro_rows
    if slots % world:
        fig["note"] = f"{slots} micro-batches per step cannot be split evenly over {world} ranks"
        return fig
    plan = plan_epoch(rows, lengths, seed, 0, global_rows, micro_rows)
    naive = plan_epoch(rows, lengths, seed, 0, global_rows, micro_rows, balance=False)
    fig.update(imbalance=rank_imbalance(plan, lengths, world), microstep_imbalance=microstep_imbalance(plan, lengths, world),
               unbalanced_imbalance=rank_imbalance(naive, lengths, world))
    return fig


def _n(x) -> str:
    x = float(x)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _assistant_token_lines(m: dict, overlong: str) -> list[str]:
    """What the build lost of what the data asks to train: assistant tokens in, and trained (training split)."""
    if "assistant_tokens" not in m:
        return []

    def line(label: str, a: dict) -> str:
        share = f" ({100 * a['trained'] / a['input']:.2f}%)" if a["input"] else ""
        return f"{label}: input {a['input']:,}, trained {a['trained']:,}{share}"

    out = [line(f"assistant_tokens (training split, data.overlong={overlong})", m["assistant_tokens"])]
    if len(m["sources"]) > 1:
        out += ["  " + line(s["path"], s["assistant_tokens"]) for s in m["sources"] if "assistant_tokens" in s]
    return out


def format_summary(data: PreparedData, fig: dict, cfg: C.SFTConfig, built: bool) -> str:
    m = data.manifest
    b = m["build"]
    head = (f"built in {b['seconds']:.1f} s: {_n(b['records_per_s'])} conversations/s, {_n(b['tokens_per_s'])} tokens/s, "
            f"{b['num_proc']} worker(s)" if built else "already built: reused")
    out = [f"data cache {data.path} ({head})", ""]
    # records = eval + eval dropped + train dropped + kept, per source; `in train` counts the mixture's copies.
    out.append(f"{'source':<44} {'records':>9} {'eval':>6} {'eval drop':>9} {'dropped':>8} {'kept':>9} {'in train':>9} "
               f"{'tokens':>9}  mixture")
    for s in m["sources"]:
        how = f"weight {s['weight']:g}" if s["weight"] is not None else f"count {s['count']}" if s["count"] is not None else "all"
        if s["upsampled"]:
            how += f", upsampled x{s['repeats']:.2f}"
        name = s["path"] if len(s["path"]) <= 44 else "..." + s["path"][-41:]
        out.append(f"{name:<44} {s['records']:>9,} {s['eval']:>6,} {s['eval_carved'] - s['eval']:>9,} "
                   f"{sum(s['dropped'].values()):>8,} {s['kept']:>9,} {s['in_train']:>9,} {_n(s['tokens']):>9}  {how}")
    out.append("")
    for name, f in m["filters"].items():
        verb = "flagged" if name == "refusal_flagged" else "dropped"
        split = f" ({f['train']:,} training, {f['eval']:,} eval)" if "eval" in f and name != "eval_copy" else ""
        what = "training copies of eval examples removed" if name == "eval_copy" else verb
        out.append(f"{name}: {f['count']:,} {what}{split}; e.g. {f['examples'][0]['where']}: {f['examples'][0]['why']}")
    for split in ("train", "eval"):
        t = m[split]
        repeats = f" (the mixture sampled them from {t['kept']:,} kept)" if t.get("kept", t["examples"]) != t["examples"] else ""
        out.append(f"{split:<5} {t['examples']:>9,} examples{repeats}  {_n(t['tokens'])} tokens ({_n(t['target_tokens'])} trained), "
                   f"{t['truncated']:,} truncated")
    out += _assistant_token_lines(m, cfg.data.overlong)
    ln = m["lengths"]
    if ln:
        out.append(f"lengths: mean {ln['mean']:,.0f}, p50 {ln['p50']:,}, p90 {ln['p90']:,}, p99 {ln['p99']:,}, max {ln['max']:,} tokens")
    out.append(f"packing {cfg.packing.strategy} at max_length {cfg.data.max_length}: {fig['rows']:,} rows, "
               f"efficiency {100 * fig['efficiency']:.2f}% (real tokens / token slots)")
    plan = (f"plan: {cfg.train.global_batch_size} rows per step, {cfg.train.micro_batch_size} per micro-batch, "
            f"{fig['steps']:,} steps per epoch; ")
    if "note" in fig:
        out.append(plan + fig["note"] + " (use --world N)")
    else:
        out.append(plan + f"world {fig['world']}: attention-cost imbalance between ranks {100 * fig['imbalance']:.1f}% "
                   f"(per micro-step {100 * fig['microstep_imbalance']:.1f}%; without balancing "
                   f"{100 * fig['unbalanced_imbalance']:.1f}%)")
    return "\n".join(out)


def run(cfg: C.SFTConfig, world: int) -> dict:
    from sft.model import build_tokenizer

    validate_data_config(cfg.data)
    if cfg.packing.strategy not in ("bfd", "off"):
        raise SFTError(f"packing.strategy={cfg.packing.strategy!r}: expected bfd or off")
    tokenizer = build_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, None, cfg.model.eot_token)
    fig = plan_figures(data.train.lengths, cfg.packing.strategy, cfg.data.max_length, cfg.run.seed,
                       cfg.train.global_batch_size, cfg.train.micro_batch_size, world)
    print(format_summary(data, fig, cfg, built=data.built), flush=True)
    return {"path": data.path, "key": data.manifest["key"], "built": data.built, **fig}


def _take_world(argv: list[str]) -> int:
    """Remove `--world N` / `--world=N` from argv (Hydra owns the rest of the command line)."""
    value = os.environ.get("WORLD_SIZE", "8")
    for i, arg in enumerate(list(argv)):
        if arg == "--world" and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            break
        if arg.startswith("--world="):
            value = arg.split("=", 1)[1]
            del argv[i]
            break
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"error: --world {value!r}: expected a number of ranks >= 1")
    return int(value)


C.register()


@hydra.main(config_path=str(C.CONF_DIR), config_name="config", version_base=None)
def _hydra_main(dcfg: DictConfig):
    try:
        return run(C.to_object(dcfg), _WORLD[0])
    except SFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


_WORLD = [8]  # set by main() from --world before Hydra takes the command line


def main():
    _WORLD[0] = _take_world(sys.argv)
    # Preparing data writes nothing into a run directory: keep Hydra from creating one.
    if not any(a.startswith("hydra.run.dir=") for a in sys.argv):
        sys.argv.append("hydra.run.dir=.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return _hydra_main()


if __name__ == "__main__":
    main()
