"""Inter-rank IO profiling: every collective's bytes, time and bus bandwidth, step breakdown, theory.

Hook API for a training loop (profile.* keys in configs/default.yaml)::

    from mycodist.profile import Profiler
    prof = Profiler(cfg.profile, run_dir, rank, world_size, engine="ddp",      # ddp | zero1 | zero2 | zero3 | fsdp
                    param_numels=[p.numel() for p in model.parameters() if p.requires_grad],
                    dtype_bytes=4)                                             # bytes per element on the wire
    ddp_model = prof.attach_ddp(ddp_model)       # DDP only: lets bucket all-reduces be seen (no-op if disabled)
    for step in range(n):
        with prof.step(step):                    # records only inside windows: profile.every / steps / start
            with prof.phase("data"): batch = next(it)
            with prof.phase("forward"): loss = ...
            with prof.phase("backward"): loss.backward()
            with prof.phase("optimizer"): opt.step(); opt.zero_grad()
    prof.close()                                 # rank 0: RUN_DIR/profile/summary.json, *.png, tensorboard/

Outside a window `step` and `phase` return a shared null context and no collective is wrapped, so the
cost is nil. The profiler never issues a collective of its own. For DeepSpeed, create the Profiler before
or after `deepspeed.initialize` (its cached all-gather/reduce-scatter functions are repointed too); pass
`persistence_threshold=stage3_param_persistence_threshold` for ZeRO-3.
"""

from mycodist.profile.collectives import CommRecord, busbw_factor
from mycodist.profile.profiler import Profiler
from mycodist.profile.recorder import CommRecorder
from mycodist.profile.steps import in_window
from mycodist.profile.theory import theory_bytes_per_step

__all__ = ["CommRecord", "CommRecorder", "Profiler", "busbw_factor", "in_window", "theory_bytes_per_step"]
