"""Two gloo ranks without training, for tests/test_multinode_units.py: the resume decision rank 0 makes and
broadcasts, and the watchdog's line from a collective that times out (mode given as argv[1])."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from mycodist.errors import UsageError
from mycodist.train.consensus import agree_on_resume
from mycodist.train.engines import TorchDDPEngine


def main() -> None:
    mode, root = sys.argv[1], Path(sys.argv[2])
    cfg = OmegaConf.create({"train": {"precision": "fp32", "grad_accum": 1, "clip_grad": 1.0, "dist_timeout": 3}})
    engine = TorchDDPEngine(cfg)
    out = {}
    if mode == "resume":
        # rank 1 lists another folder (a stale or private view) with a newer checkpoint: it must still load rank 0's
        own = root / ("rank0" if engine.rank == 0 else "rank1")
        out["auto"] = str(agree_on_resume(engine, "auto", own))
        out["none"] = str(agree_on_resume(engine, "none", own))
        os.chdir(own)  # a relative path now names another folder on each rank, like a private mount
        try:  # rank 0's choice that rank 1 cannot see: every rank fails, naming rank 1's node
            agree_on_resume(engine, "ckpt/step-00000003", own)
        except UsageError as e:
            out["invisible"] = str(e)
        (root / f"out{engine.rank}.json").write_text(json.dumps(out))
        engine.close()
    elif mode == "stall":
        if engine.rank == 0:
            engine.watchdog.step = 7
            engine.barrier()  # rank 1 never comes
        else:
            import time

            time.sleep(60)
    os._exit(0)


if __name__ == "__main__":
    main()
