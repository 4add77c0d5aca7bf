"""The machines a run is planned for, and where the plan goes: the `cluster.*` and `plan.*` config sections of `sft.plan`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ClusterConfig:
    """The machines a run is planned for (`sft.plan`); sft.train reads the GPUs it finds instead."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # GiB per GPU (H100/A100 80GB)
    host_memory_gb: float = 0.0  # GiB of RAM per node; 0 = not checked
    # Model-FLOPs utilisation the time estimate assumes. torchtitan publishes 33-39% for Llama-3.1-8B with FSDP2
    # on H100 (benchmarks/llama3_h100_202412_torchtitan.md); full activation checkpointing spends ~1/3 more
    # hardware FLOPs that model FLOPs do not count, and eager transformers modules are slower than compiled ones.
    assumed_mfu: float = 0.3
    peak_tflops: float = 989.0  # dense bf16 TFLOP/s per GPU (H100 SXM; A100: 312)
    disk_gb: float = 0.0  # GiB free where run.output_dir lives; 0 = not checked


@dataclass
class PlanConfig:
    out: str = "./plan.json"  # where `sft.plan` writes its JSON report
    data: bool = True  # read (and prepare, if no cache matches) the data for token counts and examples
    examples: int = 3  # conversations rendered with their trained tokens marked
