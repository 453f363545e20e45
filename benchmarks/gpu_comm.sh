#!/usr/bin/env bash
# One device call on a GPU machine: bench-comm over nccl and the profiler's byte check on CUDA.
# With ONE GPU, nccl runs a world of 1: no bytes leave the device, so the figures are device-side kernel
# times (launch + local copy), not link bandwidth, and busbw is 0 by definition (factor (n-1)/n = 0): read
# algbw there. With N GPUs it is the real nccl-tests analogue.
# Usage: bash benchmarks/gpu_comm.sh [OUT_DIR]   (prints the bench-comm JSON as its last line)
set -euo pipefail
OUT=${1:-${OUT:-runs/gpu_comm}}
PY=${PY:-python}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $NGPU ($($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'))"
if [ "$NGPU" -lt 1 ]; then echo "no CUDA device" >&2; exit 1; fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" || true
# 1) profiler on CUDA: one DDP step of ViT-Ti, bytes vs theory, CUDA-event timing
NPROC=$NGPU $PY - "$OUT" <<'PYEOF'
import json, os, socket, sys
import torch, torch.distributed as dist, torch.nn.functional as F
from mycodist.models import create_model
from mycodist.profile import Profiler
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
torch.cuda.set_device(0)
m = create_model("vit_tiny_patch16", num_classes=24, img_size=224).cuda()
numels = [p.numel() for p in m.parameters()]
ddp = torch.nn.parallel.DistributedDataParallel(m, device_ids=[0])
prof = Profiler({"enabled": True, "start": 2, "every": 100, "steps": 3}, sys.argv[1], 0, 1, "ddp", numels)
prof.attach_ddp(ddp)
opt = torch.optim.AdamW(ddp.parameters())
x, y = torch.randn(32, 3, 224, 224, device="cuda"), torch.randint(0, 24, (32,), device="cuda")
buf = torch.ones(64 * 2**20, device="cuda")
for step in range(6):
    with prof.step(step):
        with prof.phase("forward"): loss = F.cross_entropy(ddp(x), y)
        with prof.phase("backward"): loss.backward()
        with prof.phase("optimizer"): opt.step(); opt.zero_grad()
        dist.all_reduce(buf)  # a 256 MiB device-side all-reduce, timed with CUDA events
s = prof.close()
print(json.dumps({"clock": s["clock"], "measured": s["measured_bytes_per_step"], "bandwidth": s["bandwidth"],
                  "breakdown_ms": {k: v * 1e3 for k, v in s["step_breakdown"]["mean"]["phases_s"].items()}}))
dist.destroy_process_group()
PYEOF
# 2) bench-comm on all GPUs (1 KiB .. 1 GiB)
$PY -m mycodist bench-comm --nproc "$NGPU" --out "$OUT" profile.bench_max_bytes=1073741824 profile.bench_repeats=20
