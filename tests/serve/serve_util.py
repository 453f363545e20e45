"""Helpers for the serving tests: tiny real export folders with crafted heads, and real images, for the serving tests.

A head with zero weights and chosen biases gives the same logits for every photo, so each test can
force the probabilities (and so each verdict) while the whole real path still runs: decode, eval
transform, ViT forward, calibration, OOD score, safety rules, JSON.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from safetensors.torch import save_file

from mycodist.catalog import Species, save_class_indices, save_species
from mycodist.config import load_config, save_config
from mycodist.serve.app import RUNNER_KWARGS

try:
    from mycodist.models import create_model
except ImportError:  # the package's __init__ may not re-export it yet
    from mycodist.models.factory import create_model

IMG = 32  # the tests' model input size: a 2 x 2 patch grid keeps every forward pass in the milliseconds

LABELS = ["amanita_letalis", "agaricus_similis", "boletus_bonus", "tylopilus_amarus", "mysterium_ignotum",
          "hebeloma_toxicum", "lepista_tuta"]
SPECIES = [
    Species("amanita_letalis", "Amanita letalis", "Test death cap", "Amanitaceae", "deadly",
            lookalikes=["agaricus_similis"]),
    Species("agaricus_similis", "Agaricus similis", "Test field mushroom", "Agaricaceae", "edible",
            lookalikes=["amanita_letalis"]),
    Species("boletus_bonus", "Boletus bonus", "Test king bolete", "Boletaceae", "choice",
            lookalike_record="no dangerous lookalike known: test fixture"),
    Species("tylopilus_amarus", "Tylopilus amarus", "Test bitter bolete", "Boletaceae", "inedible"),
    Species("mysterium_ignotum", "Mysterium ignotum", "Test unknown cap", "Incertae", "unknown"),
    Species("hebeloma_toxicum", "Hebeloma toxicum", "Test poison pie", "Hymenogastraceae", "poisonous"),
    # an edible species whose deadly lookalike is in the catalogue but not among the model's classes
    Species("lepista_tuta", "Lepista tuta", "Test blewit", "Tricholomataceae", "edible",
            lookalikes=["Cortinarius absens"]),
    Species("cortinarius_absens", "Cortinarius absens", "Test webcap", "Cortinariaceae", "deadly"),
]


def logits_for(probs: dict[str, float]) -> list[float]:
    """Logits whose softmax (at T = 1) gives `probs`; unlisted classes share what is left."""
    rest = max(1e-12, 1.0 - sum(probs.values())) / max(1, len(LABELS) - len(probs))
    return [math.log(probs.get(lab, rest)) for lab in LABELS]


def tiny_builder(model_cfg: Any, num_classes: int) -> torch.nn.Module:
    """A real ViT from mycodist.models, narrowed and shortened so tests stay fast."""
    return create_model(str(model_cfg.name), num_classes, img_size=int(model_cfg.img_size),
                        embed_dim=32, depth=2, num_heads=2)


def full_builder(model_cfg: Any, num_classes: int) -> torch.nn.Module:
    """The configured architecture at full width, as the default loader builds it from config.yaml."""
    return create_model(str(model_cfg.name), num_classes, img_size=int(model_cfg.img_size))


# T = 1 and a logit OOD rule that never fires: a calibrated export whose answers the tests control
CALIBRATED = {"temperature": 1.0, "ood": {"score": "max_logit", "threshold": -1e9}}


def make_export(folder: Path, logits: list[float], calibration: dict | None = CALIBRATED,
                builder: Callable[[Any, int], torch.nn.Module] = tiny_builder) -> Path:
    """Write a complete export folder whose model answers `logits` for any photo (calibration=None: an
    export without calibration.json, which serve refuses unless serve.allow_uncalibrated=true)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [f"model.img_size={IMG}"])
    torch.manual_seed(0)
    model = builder(cfg.model, len(LABELS))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state["head.weight"].zero_()
    state["head.bias"].copy_(torch.tensor(logits))
    save_file(state, str(folder / "model.safetensors"))
    save_config(cfg, folder)
    save_class_indices(folder / "class_indices.json", LABELS)
    save_species(folder / "species.json", SPECIES)
    if calibration is not None:
        (folder / "calibration.json").write_text(json.dumps(calibration))
    return folder


def photo(size: tuple[int, int] = (96, 64), fmt: str = "JPEG", colour: tuple[int, int, int] = (150, 90, 40),
          **save_kw: Any) -> bytes:
    """A real photo-like image (a gradient with a blob) in the given format."""
    w, h = size
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    blob = Image.new("RGB", (max(1, w // 2), max(1, h // 2)), colour)
    img.paste(blob, (w // 4, h // 4))
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kw)
    return buf.getvalue()


def run_client(app: Any, body: Callable[[TestClient], Awaitable[None]]) -> None:
    """Start `app` on a free loopback port, run `body(client)`, shut everything down."""
    async def main() -> None:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(**RUNNER_KWARGS)  # as `mycodist serve` runs it
        async with TestClient(server) as client:
            await body(client)

    asyncio.run(main())


def png_bomb(width: int, height: int) -> bytes:
    """A well-formed PNG header declaring width x height, with a tiny compressed body (a decompression bomb)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    idat = zlib.compress(b"\0" * 65536, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
