"""`python -m sft.train`: prepare data, build the model, train, evaluate, checkpoint, export.

Everything that can be wrong with the input (config keys and types, conflicting settings, data
files, masks, lengths) is checked before the model is built and before anything is written into
the run directory, so a bad command never costs GPU time or damages an earlier run.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from sft import config as C
from sft import distributed as D
from sft import preemption
from sft.checkpoint import checkpoint_root, load_checkpoint, save_checkpoint
from sft.data import PreparedData, prepare_data
from sft.errors import SFTError
from sft.evaluate import eval_loss, exact_match, generate_answers, load_prompts, tracks_best
from sft.export import export_final
from sft.loader import collate
from sft.flops import model_flops
from sft.loss import check_document_isolation
from sft.metrics import MetricsLogger, Throughput, format_summary, write_report
from sft.model import VARLEN_BACKENDS, build_tokenizer
from sft.packing import build_rows, packing_efficiency, plan_epoch
from sft.parallel import EngineSpec, build_engine, needs_process_group
from sft.preemption import StopFlag, requeue
from sft.rundir import remove_created_dirs
from sft.step import accumulate_gradients
from sft.startup import begin_run, check_start, describe_splits, release_lock
from sft.templating import resolve_eot_id

log = logging.getLogger("sft")


@dataclass
class Setup:
    cfg: C.SFTConfig
    rank: int
    world: int
    accumulation: int
    device: torch.device
    run_dir: Path
    tokenizer: object
    eot_id: int
    data: PreparedData
    rows: list
    steps_per_epoch: int
    total_steps: int
    stop: StopFlag


def prepare(cfg: C.SFTConfig) -> Setup:
    """All checks and the data, before any model exists."""
    stop = StopFlag()  # first: a warning signal during start-up must still lead to a save and requeue
    rank, local_rank, world = D.init_distributed(cfg.run.dist_timeout_minutes, always=needs_process_group(cfg.parallelism))
    _setup_logging(None, rank)  # stderr only: the run directory gets its logs once the run really starts
    accumulation = C.validate(cfg, world)
    if torch.cuda.is_available():  # refuse, before loading anything, a run the plan predicts will not fit these GPUs
        from sft.plan import check_memory_fits

        check_memory_fits(cfg, world, torch.cuda.get_device_properties(local_rank).total_memory)
    run_dir = Path(D.broadcast_object(cfg.run.output_dir))
    tokenizer = build_tokenizer(cfg.model)
    eot_id = resolve_eot_id(tokenizer, cfg.model.eot_token)
    data = prepare_data(cfg.data, tokenizer, None, cfg.model.eot_token)
    rows = build_rows(data.train.lengths, cfg.packing.strategy, cfg.data.max_length)
    steps_per_epoch = math.ceil(len(rows) / cfg.train.global_batch_size)
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch
    return Setup(cfg, rank, world, accumulation, D.device_for(local_rank), run_dir, tokenizer, eot_id, data, rows,
                 steps_per_epoch, total, stop)


class _StartupRecords(logging.Handler):
    """Log records of the start-up, before the run directory may be written; replayed into the rank log."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _setup_logging(run_dir: Path | None, rank: int) -> None:
    """Rank 0 logs to stderr (other ranks only warnings). Until the run starts (run_dir None) records are
    also kept in memory; then every rank logs to logs/rank<R>.log, beginning with those records."""
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers: list[logging.Handler] = [stderr]
    held = next((h for h in logging.getLogger().handlers if isinstance(h, _StartupRecords)), None)
    if run_dir is None:
        handlers.append(_StartupRecords())
    else:
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logs / f"rank{rank}.log"))
        handlers[-1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for record in held.records if held else []:
            handlers[-1].handle(record)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def engine_spec(s: Setup) -> EngineSpec:
    cfg = s.cfg
    return EngineSpec(cfg.model, cfg.peft, cfg.parallelism, cfg.optim, cfg.train.loss_chunk_mb, s.total_steps, s.world,
                      cfg.train.micro_batch_size, s.accumulation, cfg.run.seed)


def build_training(s: Setup):
    """The engine (which builds the model as its strategy needs), then the packed-isolation proof."""
    cfg = s.cfg
    engine = build_engine(engine_spec(s), s.tokenizer, s.device)
    if cfg.packing.strategy != "off" and cfg.train.check_isolation:
        # The numeric packed == alone comparison only means something in fp32; the bitwise criterion holds in any dtype.
        with engine.compute_context():
            diff = check_document_isolation(engine.module, len(s.tokenizer), s.device, varlen=_varlen(cfg),
                                            numeric=engine.precision.compute == torch.float32)
        log.info("document isolation probe passed (max logit difference %.2e)", diff)
    return engine


def _varlen(cfg: C.SFTConfig) -> bool:
    return cfg.model.attn_implementation in VARLEN_BACKENDS


def _demo_score(engine, s: Setup, when: str, logger) -> float | None:
    cfg = s.cfg
    if not cfg.run.demo or not engine.can_generate:
        return None
    prompts = load_prompts(cfg.eval, s.data.eval, s.tokenizer, cfg.eval.score_prompts)
    with engine.compute_context():
        answers = generate_answers(engine.module.lm, s.tokenizer, prompts, cfg.eval.max_new_tokens, s.eot_id, s.device)
    score = exact_match(prompts, answers)
    logger.write(f"demo exact match {when} training: {score:.1%} of {len(prompts)} held-out prompts")
    for p, a in list(zip(prompts, answers))[:3]:
        logger.write(f"  expected {p.answer!r:>12}  generated {a!r}")
    return score


def _evaluate(engine, s: Setup, step: int, tokens: int, logger) -> float:
    cfg = s.cfg
    if len(s.data.eval) == 0:  # said once at start-up; no event, no NaN in metrics.jsonl or summary.json
        return float("nan")
    varlen = cfg.model.attn_implementation in VARLEN_BACKENDS
    loss = eval_loss(engine, s.data.eval, cfg.eval, cfg.data.max_length, cfg.packing.strategy, s.tokenizer.pad_token_id, varlen)
    event = {"step": step, "tokens": tokens, "eval_loss": loss}
    if cfg.eval.generate and engine.can_generate and s.rank == 0:
        prompts = load_prompts(cfg.eval, s.data.eval, s.tokenizer, cfg.eval.generate)
        with engine.compute_context():
            answers = generate_answers(engine.module.lm, s.tokenizer, prompts, cfg.eval.max_new_tokens, s.eot_id, s.device)
        event["exact_match"] = exact_match(prompts, answers)
        event["samples"] = [{"expected": p.answer, "generated": a} for p, a in zip(prompts, answers)]
    logger.log(event)
    return loss


def train(s: Setup) -> dict:
    cfg = s.cfg
    # Nothing is written into the run directory until every check has passed and the model is loaded.
    resume = check_start(cfg, s.run_dir, s.data.manifest["key"])
    eff = packing_efficiency(s.rows, s.data.train.lengths, cfg.data.max_length)
    log.info("data %s: %s, %d rows, packing efficiency %.1f%%, %d steps (%d per epoch), accumulation %d",
             s.data.path, describe_splits(s.data), len(s.rows), 100 * eff, s.total_steps, s.steps_per_epoch, s.accumulation)
    engine = build_training(s)
    state = {"step": 0, "tokens": 0, "best_eval": math.inf, "evals_since_best": 0, "best_step": 0}
    if resume.path is not None:
        saved = load_checkpoint(resume.path, engine)
        state.update({k: saved.get(k, state[k]) for k in state})
    begin_run(cfg, s.run_dir, engine, resume, state["step"])
    _setup_logging(s.run_dir, s.rank)
    if resume.path is not None:
        log.info("resumed from %s at step %d", resume.path, state["step"])
    logger = MetricsLogger(s.run_dir, cfg.logging, s.total_steps, s.rank == 0, C.redact(C.plain_dict(cfg)), cfg.run.name)
    logger.set_position(state["step"])
    score_before = _demo_score(engine, s, "before", logger) if state["step"] == 0 else None
    stop = s.stop
    varlen = _varlen(cfg)
    pad_id = s.tokenizer.pad_token_id
    meter = Throughput(model_flops(engine.module), s.world, cfg.train.peak_tflops * 1e12)
    plan, plan_epoch_no = None, -1
    preempted = False

    def checkpoint():
        if getattr(checkpoint, "saved_step", None) == state["step"]:  # saved already (as a new best, before the cadence's)
            return
        checkpoint.saved_step = state["step"]
        train_state = dict(state, data_key=s.data.manifest["key"], config_hash=C.config_hash(cfg), scheduler=engine.scheduler.state_dict())
        save_checkpoint(str(s.run_dir), state["step"], engine, train_state, cfg.checkpoint.keep, protect=_best_name(state))

    while state["step"] < s.total_steps:
        epoch, index = divmod(state["step"], s.steps_per_epoch)
        if epoch != plan_epoch_no:
            plan = plan_epoch(s.rows, s.data.train.lengths, cfg.run.seed, epoch, cfg.train.global_batch_size, cfg.train.micro_batch_size)
            plan_epoch_no = epoch
        micro = [collate(r, s.data.train, pad_id, varlen) for r in plan.micro_batches(index, s.rank, s.world)]
        lr = engine.lr
        meter.start_step()
        totals = accumulate_gradients(engine, micro)
        grad_norm = engine.clip_and_step()
        state["step"] += 1
        state["tokens"] += int(totals.tokens)
        step = state["step"]
        if step % cfg.train.log_every == 0 or step == s.total_steps:
            loss, grad_norm = totals.global_loss(), float(grad_norm)  # the only waits for the device
            meter.add(totals.tokens, totals.attention_pairs)
            logger.log({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                        "tokens": state["tokens"], "target_tokens": int(totals.targets), **meter.read()})
        else:
            meter.add(totals.tokens, totals.attention_pairs)
        if (cfg.eval.every and step % cfg.eval.every == 0) or step == s.total_steps:
            val = _evaluate(engine, s, step, state["tokens"], logger)
            if val < state["best_eval"] - 1e-6:
                state["best_eval"], state["best_step"], state["evals_since_best"] = val, step, 0
                if tracks_best(cfg.eval):
                    checkpoint()  # final/ will be this model unless a better one comes: it must be on disk
            elif not math.isnan(val):  # no eval examples: nothing to compare, so never a reason to stop
                state["evals_since_best"] += 1
            if cfg.eval.early_stopping_patience and state["evals_since_best"] >= cfg.eval.early_stopping_patience:
                logger.write(f"early stopping at step {step}: no better eval loss in {state['evals_since_best']} evaluations")
                checkpoint()
                break
        if stop.should_stop():
            logger.write(f"stop signal received: saving step {step} and exiting" + (" for requeue" if stop.requeue_wanted else ""))
            checkpoint()
            preempted = True
            break
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == s.total_steps:
            checkpoint()
    logger.close()
    if preempted:
        requeue()
        return {"preempted": True, "step": state["step"]}
    final_step = _restore_best(engine, s, state, logger)
    engine.release_optimizer()  # training is over: the export's tensors must not sit beside AdamW's state
    export_final(engine, s.tokenizer, s.run_dir, s.eot_id, int(cfg.checkpoint.export_shard_gb * 2**30))
    score_after = _demo_score(engine, s, "after", logger)
    summary = {
        "run_name": cfg.run.name, "steps": state["step"], "tokens_trained": state["tokens"],
        "tokens_per_s": _mean([e["tokens_per_s"] for e in logger.events if "tokens_per_s" in e]),
        "packing_efficiency": eff, "last_eval_loss": _last(logger.events, "eval_loss"),
        "best_eval_loss": state["best_eval"] if state["best_step"] else None, "best_eval_step": state["best_step"] or None,
        "final_step": final_step, "final_is": "best" if final_step == state["best_step"] else "last",
        "stop_reason": _stop_reason(cfg, state),
        "demo_exact_match_before": score_before, "demo_exact_match_after": score_after,
    }
    summary = {k: v for k, v in summary.items() if v is not None}
    if s.rank == 0:
        write_report(s.run_dir, logger.events, summary)
        logger.write(f"run directory: {s.run_dir}\n" + format_summary(summary))
    return summary


def _best_name(state: dict) -> str | None:
    return f"step-{state['best_step']:06d}" if state["best_step"] else None


def _stop_reason(cfg: C.SFTConfig, state: dict) -> str:
    patience = cfg.eval.early_stopping_patience
    if patience and state["evals_since_best"] >= patience:
        return "early_stopping"
    return "max_steps" if cfg.train.max_steps > 0 else "epochs"


def _restore_best(engine, s: Setup, state: dict, logger) -> int:
    """With keep_best or early stopping, put the best checkpoint's weights into the engine (every rank,
    any engine: the same load as a resume) so that final/ is the best model. Returns the step it holds."""
    best = state["best_step"]
    if not tracks_best(s.cfg.eval) or not best or best == state["step"]:
        return state["step"]
    path = checkpoint_root(s.run_dir) / _best_name(state)
    if not (path / "train_state.json").exists():
        logger.write(f"warning: best checkpoint {path} is missing: final/ holds the last step ({state['step']}) instead")
        return state["step"]
    load_checkpoint(path, engine)
    logger.write(f"final/ holds the best model: step {best}, eval loss {state['best_eval']:.4f} (last step {state['step']})")
    return best


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _last(events, key):
    vals = [e[key] for e in events if key in e]
    return vals[-1] if vals else None


def run(cfg: C.SFTConfig) -> dict:
    return train(prepare(cfg))


C.register()


@hydra.main(config_path=str(C.CONF_DIR), config_name="config", version_base=None)
def main(dcfg: DictConfig):
    """Exit codes: 0 finished (or stopped and requeued by Slurm), 2 bad input or setting (one line on
    stderr, nothing in the run directory changed), 128 + signal number when stopped by a signal after
    saving (130 Ctrl-C, 138 SIGUSR1, 140 SIGUSR2, 143 SIGTERM or a dead launcher; see sft/preemption.py)."""
    try:
        summary = run(C.to_object(dcfg))
    except SFTError as exc:
        remove_created_dirs()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        remove_created_dirs()
        print("error: interrupted twice: stopped without saving (checkpoints/LATEST, if any, is intact)", file=sys.stderr)
        sys.exit(130)
    finally:
        release_lock()
    D.shutdown()
    code = preemption.exit_code()
    if code:
        sys.exit(code)
    return summary


if __name__ == "__main__":
    main()
