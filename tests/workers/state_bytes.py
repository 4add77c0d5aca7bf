"""Worker for test_plan: for each case, build the engine the way training does, take one optimizer step and one
more micro-step, then write the bytes this rank holds (parameters, gradients, optimizer state, engine buffers),
summed over distinct storages, to OUT.<case>.rank<r>.json."""

import json
import sys

sys.path.insert(0, sys.argv[1])
from conftest import compose  # noqa: E402
from sft import distributed as D  # noqa: E402
from sft.loader import collate  # noqa: E402
from sft.packing import plan_epoch  # noqa: E402
from sft.step import accumulate_gradients  # noqa: E402
from sft.train import build_training, prepare  # noqa: E402


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


class Storages:
    """Bytes of distinct storages: views of one flat buffer count once."""

    def __init__(self):
        self.seen = set()

    def __call__(self, tensors) -> int:
        total = 0
        for t in tensors:
            if t is None:
                continue
            st = local(t).untyped_storage()
            if st.data_ptr() in self.seen or st.nbytes() == 0:
                continue
            self.seen.add(st.data_ptr())
            total += st.nbytes()
        return total


def run_case(out: str, overrides: list[str]) -> None:
    s = prepare(compose(overrides))
    engine = build_training(s)
    cfg = s.cfg
    plan = plan_epoch(s.rows, s.data.train.lengths, cfg.run.seed, 0, cfg.train.global_batch_size, cfg.train.micro_batch_size)
    pad = s.tokenizer.pad_token_id
    micro = [collate(r, s.data.train, pad, False) for r in plan.micro_batches(0, s.rank, s.world)]
    accumulate_gradients(engine, micro)
    engine.clip_and_step()
    # A non-final micro-step of the next optimizer step: the gradients held between micro-steps.
    micro = [collate(r, s.data.train, pad, False) for r in plan.micro_batches(1, s.rank, s.world)]
    assert len(micro) > 1, "the case needs gradient accumulation"
    engine.forward_backward(micro[0], 1e-3, last_micro=False)
    count = Storages()
    result = {}
    if cfg.parallelism.strategy == "fsdp":
        params = list(engine.module.parameters())
        result["params"] = count(params)
        result["grads"] = count(p.grad for p in params)
        result["optimizer"] = count(v for st in engine.optimizer.state.values() for v in st.values() if hasattr(v, "untyped_storage"))
        # parallelism.accumulate_unsharded: FSDP2's unsharded gradients between micro-steps, in the reduce dtype
        # (its accumulator when that differs from the compute dtype, else the unsharded parameter's .grad)
        from torch.distributed.fsdp import FSDPModule

        accumulators = [fp.unsharded_accumulated_grad if fp.unsharded_accumulated_grad is not None else fp._unsharded_param.grad
                        for m in engine.module.modules() if isinstance(m, FSDPModule)
                        for group in m._get_fsdp_state()._fsdp_param_groups for fp in group.fsdp_params]
        result["buffers"] = count(accumulators)
    else:  # DeepSpeed ZeRO-3: its partitions and flat buffers
        opt = engine.optimizer
        result["params"] = count(p.ds_tensor for p in engine.module.parameters())
        result["master"] = count(opt.fp32_partitioned_groups_flat)
        result["grads"] = count([opt.grad_partitions_flat_buffer])
        result["buffers"] = count([g.grad for g in opt.fp32_partitioned_groups_flat] + [b.buffer for b in opt.ipg_buckets.values()])
        result["optimizer"] = count(v for st in opt.optimizer.state.values() for v in st.values() if hasattr(v, "untyped_storage"))
        result["accumulation"] = s.accumulation
    with open(f"{out}.rank{D.rank()}.json", "w") as f:
        json.dump(result, f)


# Several cases in one process group (one start-up): cases are separated by "--", the i-th writes OUT.<i>.rank<r>.json.
cases, current = [], []
for arg in sys.argv[3:]:
    if arg == "--":
        cases.append(current)
        current = []
    else:
        current.append(arg)
cases.append(current)
for i, overrides in enumerate(cases):
    run_case(f"{sys.argv[2]}.{i}", overrides)
D.shutdown()
