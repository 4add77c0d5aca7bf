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
from omegaconf import DictConfig, OmegaConf

from sft import config as C
from sft import distributed as D
from sft.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from sft.data import PreparedData, prepare_data
from sft.errors import SFTError
from sft.evaluate import eval_loss, exact_match, generate_answers, load_prompts
from sft.export import export_final
from sft.loader import collate
from sft.loss import ChunkedLossLM, check_document_isolation
from sft.metrics import MetricsLogger, Throughput, format_summary, write_report
from sft.model import VARLEN_BACKENDS, apply_peft, build_model, build_tokenizer
from sft.packing import build_rows, packing_efficiency, plan_epoch
from sft.parallel import build_engine
from sft.preemption import StopFlag, requeue
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
    rank, local_rank, world = D.init_distributed(always=cfg.parallelism.strategy in ("fsdp", "zero3"))
    accumulation = C.validate(cfg, world)
    run_dir = Path(D.broadcast_object(cfg.run.output_dir))
    tokenizer = build_tokenizer(cfg.model)
    eot_id = resolve_eot_id(tokenizer, cfg.model.eot_token)
    data = prepare_data(cfg.data, tokenizer, None, cfg.model.eot_token)
    rows = build_rows(data.train.lengths, cfg.packing.strategy, cfg.data.max_length)
    steps_per_epoch = math.ceil(len(rows) / cfg.train.global_batch_size)
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch
    return Setup(cfg, rank, world, accumulation, D.device_for(local_rank), run_dir, tokenizer, eot_id, data, rows,
                 steps_per_epoch, total, stop)


def _setup_logging(run_dir: Path, rank: int) -> None:
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handlers = [logging.FileHandler(logs / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _build_module(cfg: C.SFTConfig, tokenizer, device="cpu") -> ChunkedLossLM:
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, tokenizer, device, quantize_4bit=cfg.peft.method == "qlora")
    return ChunkedLossLM(apply_peft(model, cfg.peft), cfg.train.loss_chunk_size)


def build_training(s: Setup):
    """Model -> PEFT -> loss module -> engine.

    FSDP2 never builds the full model on every rank: all ranks shard a meta-device skeleton and
    rank 0 alone loads the weights, which reach the other ranks shard by shard. ZeRO-3 loading a
    checkpoint partitions at construction (zero.Init through transformers' DeepSpeed integration).
    """
    cfg = s.cfg
    args = (cfg.parallelism, cfg.optim, s.total_steps, s.device, s.world, cfg.train.micro_batch_size, s.accumulation)
    if cfg.parallelism.strategy == "fsdp":
        full_state = _build_module(cfg, s.tokenizer).state_dict() if s.rank == 0 else {}
        engine = build_engine(_build_module(cfg, s.tokenizer, "meta"), *args, full_state=full_state)
        del full_state
    elif cfg.parallelism.strategy == "zero3" and cfg.model.path is not None:
        from sft.zero3 import zero_init_scope

        with zero_init_scope(*args[:5], cfg.train.micro_batch_size, s.accumulation):
            module = _build_module(cfg, s.tokenizer)
        engine = build_engine(module, *args)
    else:
        engine = build_engine(_build_module(cfg, s.tokenizer), *args)
    if cfg.packing.strategy != "off" and cfg.train.check_isolation:
        diff = check_document_isolation(engine.module, len(s.tokenizer), s.device)
        log.info("document isolation probe passed (max logit difference %.2e)", diff)
    return engine


def _demo_score(engine, s: Setup, when: str, logger) -> float | None:
    cfg = s.cfg
    if not cfg.run.demo or cfg.parallelism.strategy not in ("single", "ddp"):
        return None
    prompts = load_prompts(cfg.eval, s.data.eval, s.tokenizer, cfg.eval.score_prompts)
    answers = generate_answers(engine.module.lm, s.tokenizer, prompts, cfg.eval.max_new_tokens, s.eot_id, s.device)
    score = exact_match(prompts, answers)
    logger.write(f"demo exact match {when} training: {score:.1%} of {len(prompts)} held-out prompts")
    for p, a in list(zip(prompts, answers))[:3]:
        logger.write(f"  expected {p.answer!r:>12}  generated {a!r}")
    return score


def _evaluate(engine, s: Setup, step: int, tokens: int, logger) -> float:
    cfg = s.cfg
    varlen = cfg.model.attn_implementation in VARLEN_BACKENDS
    loss = eval_loss(engine, s.data.eval, cfg.eval, cfg.data.max_length, cfg.packing.strategy, s.tokenizer.pad_token_id, varlen)
    event = {"step": step, "tokens": tokens, "eval_loss": loss}
    if cfg.eval.generate and cfg.parallelism.strategy in ("single", "ddp") and s.rank == 0:
        prompts = load_prompts(cfg.eval, s.data.eval, s.tokenizer, cfg.eval.generate)
        answers = generate_answers(engine.module.lm, s.tokenizer, prompts, cfg.eval.max_new_tokens, s.eot_id, s.device)
        event["exact_match"] = exact_match(prompts, answers)
        event["samples"] = [{"expected": p.answer, "generated": a} for p, a in zip(prompts, answers)]
    logger.log(event)
    return loss


def accumulate_gradients(engine, micro: list) -> tuple[float, float, float]:
    """Backward over this rank's micro-batches of one optimizer step; returns (loss, target tokens, tokens), global.

    The denominator is the global target-token count, summed before any backward pass, so every
    target token of the step weighs the same however the step is split over micro-batches and ranks.
    """
    targets, tokens = D.all_reduce_sum([sum(m.num_target for m in micro), sum(m.num_tokens for m in micro)])
    scale = 1.0 / max(targets, 1.0)
    loss_sum = sum(engine.forward_backward(m, scale, i == len(micro) - 1) for i, m in enumerate(micro))
    return D.all_reduce_sum([loss_sum])[0] * scale, targets, tokens


def train(s: Setup) -> dict:
    cfg = s.cfg
    resume_from = resolve_resume(str(s.run_dir), cfg.run.resume)
    if s.rank == 0:
        s.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(C.redact(C.plain_dict(cfg))), s.run_dir / "config.yaml")
    D.barrier()
    _setup_logging(s.run_dir, s.rank)
    eff = packing_efficiency(s.rows, s.data.train.lengths, cfg.data.max_length)
    log.info("data %s: %d train / %d eval examples, %d rows, packing efficiency %.1f%%, %d steps (%d per epoch), accumulation %d",
             s.data.path, len(s.data.train), len(s.data.eval), len(s.rows), 100 * eff, s.total_steps, s.steps_per_epoch, s.accumulation)
    engine = build_training(s)
    state = {"step": 0, "tokens": 0, "best_eval": math.inf, "evals_since_best": 0}
    if resume_from is not None:
        saved = load_checkpoint(resume_from, engine)
        if saved["data_key"] != s.data.manifest["key"]:
            raise SFTError(f"{resume_from}: written for another dataset (cache {saved['data_key']}); use run.resume=never or a new run.output_dir")
        state.update({k: saved[k] for k in state})
        log.info("resumed from %s at step %d", resume_from, state["step"])
    logger = MetricsLogger(s.run_dir, cfg.logging, s.total_steps, s.rank == 0, C.redact(C.plain_dict(cfg)), cfg.run.name)
    logger.set_position(state["step"])
    score_before = _demo_score(engine, s, "before", logger) if state["step"] == 0 else None
    stop = s.stop
    varlen = cfg.model.attn_implementation in VARLEN_BACKENDS
    pad_id = s.tokenizer.pad_token_id
    flops_per_token = 6 * sum(p.numel() for p in engine.module.parameters()) * s.world
    meter = Throughput(flops_per_token, cfg.train.peak_tflops * 1e12 * s.world)
    plan, plan_epoch_no = None, -1
    preempted = False

    def checkpoint():
        train_state = dict(state, data_key=s.data.manifest["key"], config_hash=C.config_hash(cfg), scheduler=engine.scheduler.state_dict())
        save_checkpoint(str(s.run_dir), state["step"], engine, train_state, cfg.checkpoint.keep)

    while state["step"] < s.total_steps:
        epoch, index = divmod(state["step"], s.steps_per_epoch)
        if epoch != plan_epoch_no:
            plan = plan_epoch(s.rows, s.data.train.lengths, cfg.run.seed, epoch, cfg.train.global_batch_size, cfg.train.micro_batch_size)
            plan_epoch_no = epoch
        micro = [collate(r, s.data.train, pad_id, varlen) for r in plan.micro_batches(index, s.rank, s.world)]
        lr = engine.lr
        loss, targets, tokens = accumulate_gradients(engine, micro)
        grad_norm = engine.clip_and_step()
        state["step"] += 1
        state["tokens"] += int(tokens)
        step = state["step"]
        if step % cfg.train.log_every == 0 or step == s.total_steps:
            logger.log({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": state["tokens"],
                        "target_tokens": int(targets), **meter.tick(tokens)})
        if (cfg.eval.every and step % cfg.eval.every == 0) or step == s.total_steps:
            val = _evaluate(engine, s, step, state["tokens"], logger)
            if val < state["best_eval"] - 1e-6:
                state["best_eval"], state["evals_since_best"] = val, 0
            else:
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
    export_final(engine, s.tokenizer, s.run_dir, s.eot_id, int(cfg.checkpoint.export_shard_gb * 2**30))
    score_after = _demo_score(engine, s, "after", logger)
    summary = {
        "run_name": cfg.run.name, "steps": state["step"], "tokens_trained": state["tokens"],
        "tokens_per_s": _mean([e["tokens_per_s"] for e in logger.events if "tokens_per_s" in e]),
        "packing_efficiency": eff, "eval_loss": _last(logger.events, "eval_loss"),
        "demo_exact_match_before": score_before, "demo_exact_match_after": score_after,
    }
    summary = {k: v for k, v in summary.items() if v is not None}
    if s.rank == 0:
        write_report(s.run_dir, logger.events, summary)
        logger.write(f"run directory: {s.run_dir}\n" + format_summary(summary))
    return summary


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
    try:
        return run(C.to_object(dcfg))
    except SFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
