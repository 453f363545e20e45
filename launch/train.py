"""Training entry for launchers: `accelerate launch launch/train.py key=value...`,
`deepspeed --num_gpus 8 launch/train.py ...` or `torchrun --nproc_per_node 8 launch/train.py ...`.
All logic lives in mycodist.train and mycodist.export (docs/training.md)."""

import sys

from mycodist.rank_entry import main

if __name__ == "__main__":
    sys.exit(main())
