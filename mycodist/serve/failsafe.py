"""Fail safe when the export lacks what the safety rules stand on.

Without `calibration.json`'s temperature the probabilities are raw softmax (often over-confident), and
without OOD statistics a photo of anything at all gets a species answer. `mycodist serve` and `predict`
therefore refuse such an export unless `serve.allow_uncalibrated=true`; then every answer is capped at
`do_not_eat` and says why (verdict.decide's `uncalibrated` rule).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mycodist.errors import UsageError


def require_calibrated(info: dict[str, Any], allow_uncalibrated: bool, export_dir: str | Path) -> None:
    """Refuse to serve an uncalibrated export unless the user explicitly allowed it."""
    problem = info.get("uncalibrated", "")
    if problem and not allow_uncalibrated:
        raise UsageError(f"'{export_dir}' cannot be served safely: {problem}. Re-export it with "
                         "`mycodist export RUN_DIR`, or pass serve.allow_uncalibrated=true to serve it anyway "
                         "(then no answer is better than do_not_eat)")


def allow_flag(serve_cfg: Any) -> bool:
    value = serve_cfg.get("allow_uncalibrated", False)
    if not isinstance(value, bool):
        raise UsageError(f"serve.allow_uncalibrated must be true or false, got {value!r}")
    return value
