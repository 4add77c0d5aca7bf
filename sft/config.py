"""The run's configuration: the schema Hydra validates against, cross-key checks, and derived sizes.

Each section's dataclass lives beside the code it configures; this module only assembles them,
so Hydra rejects unknown keys and wrong types (struct mode) before any work starts, and
`validate` rejects combinations no single key can catch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sft.checkpoint import CheckpointConfig
from sft.data import DataConfig, validate_data_config
from sft.errors import SFTError
from sft.evaluate import EvalConfig
from sft.cluster import ClusterConfig, PlanConfig
from sft.metrics import SECRET_ENV, LoggingConfig
from sft.model import ModelConfig, PeftConfig, asset_path, validate_model_config
from sft.optim import OptimConfig, validate_optim_config
from sft.packing import PackingConfig
from sft.parallel import ParallelConfig, validate_parallel_config

SECRET_KEYS = {"hf_token", "access_token", "api_key", "password", "secret"}
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class RunConfig:
    name: str = "demo"
    output_dir: str = "${oc.env:SFT_OUTPUT_DIR,runs/${run.name}/${sft_run_id:}}"
    seed: int = 0
    # auto: continue from checkpoints/LATEST if present | never | PATH to a checkpoint or run dir |
    # force: like auto, but continue even if the trajectory settings changed (recorded in metrics.jsonl)
    resume: str = "auto"
    demo: bool = False  # score generated answers before and after training
    # How long a rank waits in one collective before the run fails (NCCL/gloo process-group timeout). The
    # longest wait is at start-up, while rank 0 alone reads the checkpoint and the others wait to receive
    # it: 30 minutes covers a 7-8B model from a slow filesystem; the 70B experiment sets 60 (see there).
    dist_timeout_minutes: int = 30


@dataclass
class TrainConfig:
    global_batch_size: int = 32  # rows (packed sequences of <= data.max_length tokens) per optimizer step, all ranks
    micro_batch_size: int = 1  # rows per forward pass on one rank; the rest of the global batch is accumulation
    max_steps: int = -1  # optimizer steps; -1 trains `epochs` full passes
    epochs: int = 1
    log_every: int = 1
    # Bytes of fp32 logits (with their softmax and gradient) one output-layer chunk may hold; the chunk's
    # token count follows from the vocabulary (sft.loss.loss_chunk_tokens): ~170 tokens at 128k, ~24k at 264.
    loss_chunk_mb: float = 256.0
    check_isolation: bool = True  # the packed-vs-alone probe at start-up
    skip_memory_check: bool = False  # start even if the memory plan (sft.memory) predicts the GPUs are too small
    peak_tflops: float = 0.0  # per device, for MFU; 0 leaves MFU out


@dataclass
class SFTConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    parallelism: ParallelConfig = field(default_factory=ParallelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # what sft.plan plans for
    plan: PlanConfig = field(default_factory=PlanConfig)


def _run_id() -> str:
    """One id per launch, the same on every rank: the scheduler's job id, the launcher's run id, or a timestamp
    exported to the environment so that child processes started later agree."""
    for var in ("SFT_RUN_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(var)
        if value and value != "none":
            if var == "SLURM_JOB_ID" and os.environ.get("SLURM_ARRAY_TASK_ID"):
                value = f"{os.environ.get('SLURM_ARRAY_JOB_ID', value)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            return value
    # Ranks started by one launcher agent (accelerate launch's static rendezvous has no run id) share
    # their parent: its start time names the run identically on every rank, however late each starts.
    started = _parent_start_time() if "LOCAL_RANK" in os.environ else None
    os.environ["SFT_RUN_ID"] = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    return os.environ["SFT_RUN_ID"]


def _parent_start_time() -> float | None:
    try:
        fields = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat: start time in clock ticks after boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def register() -> None:
    from hydra.core.config_store import ConfigStore

    for name, fn in (("sft_run_id", _run_id), ("sft_asset", asset_path)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    ConfigStore.instance().store(name="sft_schema", node=SFTConfig)


def to_object(cfg: DictConfig) -> SFTConfig:
    """Resolve interpolations and convert to dataclasses (types were already checked by Hydra)."""
    try:
        return OmegaConf.to_object(cfg)
    except Exception as exc:  # omegaconf's errors carry the full key; keep only the message
        raise SFTError(f"config: {exc}") from None


def derive_accumulation(train: TrainConfig, world: int) -> int:
    """Micro-steps per optimizer step: the global batch split over `world` ranks of micro_batch_size rows."""
    per_step = train.micro_batch_size * world
    if train.global_batch_size % per_step:
        fit = -(-train.global_batch_size // per_step) * per_step  # the next multiple up
        raise SFTError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"train.micro_batch_size={train.micro_batch_size} x {world} processes; set train.global_batch_size to a "
            f"multiple of {per_step} (e.g. {fit})"
        )
    return train.global_batch_size // per_step


def validate(cfg: SFTConfig, world: int) -> int:
    """Cross-key checks; returns gradient accumulation steps. Runs before any data or model work."""
    validate_optim_config(cfg.optim)
    validate_parallel_config(cfg.parallelism, world, cfg.model.dtype)
    validate_data_config(cfg.data)
    validate_model_config(cfg.model, cfg.peft, packing_on=cfg.packing.strategy != "off", max_length=cfg.data.max_length)
    if cfg.packing.strategy not in ("bfd", "off"):
        raise SFTError(f"packing.strategy={cfg.packing.strategy!r}: expected bfd or off")
    if cfg.train.max_steps == 0 or cfg.train.max_steps < -1 or cfg.train.epochs < 1:
        raise SFTError("train.max_steps must be positive (or -1 to train train.epochs epochs) and train.epochs >= 1")
    if cfg.train.micro_batch_size < 1 or cfg.train.global_batch_size < 1:
        raise SFTError("train.micro_batch_size and train.global_batch_size must be >= 1")
    if cfg.run.resume not in ("auto", "never", "force") and not Path(cfg.run.resume).exists():
        raise SFTError(f"run.resume={cfg.run.resume}: no such checkpoint or run directory")
    if cfg.run.demo and cfg.data.name == "demo" and cfg.data.path and Path(cfg.data.path) != Path(asset_path("demo/conversations.jsonl")):
        # data.path alone keeps the demo group: its 150 steps, lr 3e-3 and scoring would silently apply to the user's file.
        raise SFTError(f"data.path={cfg.data.path} was given with the demo's data group: add data=jsonl (or data=hub) "
                       "so the run gets production settings instead of the demo's")
    if cfg.peft.method == "qlora" and cfg.parallelism.strategy == "zero3":
        raise SFTError("peft=qlora with parallelism=zero3 is not supported; use fsdp or lora")
    return derive_accumulation(cfg.train, world)


def plain_dict(cfg: SFTConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def redact(obj):
    """A copy with values that look like credentials replaced, for config.yaml and wandb."""
    secrets = {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    if isinstance(obj, dict):
        return {k: ("<redacted>" if k.lower() in SECRET_KEYS or k.lower().endswith(("_api_key", "_password", "_secret")) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str) and obj in secrets:
        return "<redacted>"
    return obj


# What never changes the trained weights' path: where and how often things are written or evaluated,
# how the work is split over processes (batch sizes are global, the loss is topology-invariant), how far
# the run goes, and where the data cache lives. Everything else (optim, global batch, model, data,
# packing, seed, max_length, peft) is the trajectory that a resume must not change silently.
NOT_TRAJECTORY = (
    "run", "checkpoint", "logging", "eval", "cluster", "plan",
    # how the work is sharded; the precision keys (master/param/reduce dtype) do change the weights
    "parallelism.strategy", "parallelism.cpu_offload", "parallelism.reshard_after_forward", "parallelism.zero3_bucket_size",
    "parallelism.accumulate_unsharded",
    "train.max_steps", "train.epochs", "train.log_every", "train.micro_batch_size", "train.loss_chunk_mb",
    "train.check_isolation", "train.skip_memory_check", "train.peak_tflops", "data.name", "data.cache_dir", "data.prepared", "data.num_proc",
    "model.attn_implementation", "model.activation_checkpointing",
)
TRAJECTORY_RUN_KEYS = ("run.seed",)  # of run.*, only the seed decides the weights (names, dirs, timeouts do not)


def trajectory(cfg: SFTConfig | dict) -> dict:
    """The trajectory settings as flat dotted keys -> values (from a config or a plain config dict)."""
    flat = {}

    def walk(prefix: str, value) -> None:
        kept = any(k == prefix or k.startswith(prefix + ".") for k in TRAJECTORY_RUN_KEYS)
        if not kept and any(prefix == k or prefix.startswith(k + ".") for k in NOT_TRAJECTORY):
            return
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        else:
            flat[prefix] = value

    walk("", cfg if isinstance(cfg, dict) else plain_dict(cfg))
    return flat


def trajectory_diff(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every trajectory key that differs between two trajectory() dicts.

    A key present on one side only is a setting added to (or removed from) the schema since the
    checkpoint was written, whose default keeps the old behaviour: not a change. List items
    (`data.sources[2].path`) are the exception: one side having more of them is a change."""
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if (a is missing or b is missing) and "[" not in key:
            continue
        if a != b:
            out.append(f"{key}: {'(unset)' if a is missing else a} -> {'(unset)' if b is missing else b}")
    return out


def config_hash(cfg: SFTConfig | dict) -> str:
    """Hash of what decides the trained weights (see NOT_TRAJECTORY for what is left out)."""
    return hashlib.sha256(json.dumps(trajectory(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]
