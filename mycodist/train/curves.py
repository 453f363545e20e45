"""The training curve of a run as a PNG, from RUN_DIR/train_log.jsonl (loss per step, eval top-1/top-5):

    python -m mycodist.train.curves RUN_DIR OUT.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mycodist.atomic import atomic_open
from mycodist.train.run_log import LOG_FILE


def read_log(run_dir: Path) -> tuple[dict[int, float], dict[int, dict]]:
    train, evals = {}, {}
    for line in (Path(run_dir) / LOG_FILE).read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            train[rec["step"]] = rec["loss"]
        elif rec["kind"] == "eval":
            evals[rec["step"]] = rec
    return train, evals


def plot_curves(run_dir: Path, out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_log(run_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(train), list(train.values()), color="tab:blue", lw=1, label="train loss")
    ax.plot(list(evals), [e["loss"] for e in evals.values()], "o-", color="tab:cyan", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(list(evals), [e["top1"] for e in evals.values()], "s-", color="tab:red", label="val top-1")
    ax2.plot(list(evals), [e["top5"] for e in evals.values()], "^--", color="tab:orange", label="val top-5")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("accuracy")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax.set_title(title or str(run_dir), fontsize=9)
    fig.tight_layout()
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m mycodist.train.curves RUN_DIR OUT.png [TITLE]")
    print(plot_curves(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else ""))
