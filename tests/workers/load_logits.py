"""Worker for test_distributed: build the engine the way training does, save logits of a fixed input (rank 0)."""

import sys

import torch

sys.path.insert(0, sys.argv[1])
from conftest import compose  # noqa: E402
from sft import distributed as D  # noqa: E402
from sft.train import build_training, prepare  # noqa: E402

out, overrides = sys.argv[2], sys.argv[3:]
s = prepare(compose(overrides))
engine = build_training(s)
ids = torch.randint(3, 260, (2, 24), generator=torch.Generator().manual_seed(7))
pos = torch.arange(24).expand(2, 24)
with torch.no_grad():
    logits = engine.module(ids, pos)
if D.rank() == 0:
    torch.save(logits, out)
del engine  # its device mesh holds the process group: free it before the group is destroyed
D.shutdown()
