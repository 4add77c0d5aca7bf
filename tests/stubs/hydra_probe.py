"""A Hydra callback for tests: each process records the output directory Hydra gave its job.

    PYTHONPATH=tests/stubs python -m sft.train +hydra.callbacks.probe._target_=hydra_probe.RecordOutputDir \
        +hydra.callbacks.probe.out=/tmp/probe ...
writes /tmp/probe/rank{RANK}-job{N}-pid{PID}.json with Hydra's runtime.output_dir.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback


class RecordOutputDir(Callback):
    def __init__(self, out: str):
        self.out = Path(out)

    def on_job_start(self, config, **kwargs) -> None:
        hc = HydraConfig.get()
        num = hc.job.get("num", None)
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"rank": int(os.environ.get("RANK", 0)), "job": num, "hydra_output_dir": hc.runtime.output_dir}
        (self.out / f"rank{record['rank']}-job{num}-pid{os.getpid()}.json").write_text(json.dumps(record))
