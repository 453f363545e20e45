#!/usr/bin/env bash
# Wheels the GPU machine lacks (its image has torch, accelerate, timm, torchvision, safetensors, tensorboard,
# aiohttp ... but not these), for its Python 3.12, into .whl/ (git-ignored). Run on a CPU machine with network
# access to PyPI, then carry .whl to the GPU call. DeepSpeed ships as source only: its wheel is built here
# (pure Python at build time; ops compile lazily on the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
dl=(-m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl)
"$PY" "${dl[@]}" --no-deps omegaconf==2.3.0 webdataset braceexpand hjson ninja msgpack simplejpeg
"$PY" "${dl[@]}" pydantic  # with its own pins (pydantic-core must match it exactly)
"$PY" -m pip download -q --no-deps --no-binary=:all: -d .whl antlr4-python3-runtime==4.9.3  # source only
# an sdist among them (antlr4's) becomes a wheel here
for sd in .whl/*.tar.gz; do [ -e "$sd" ] || continue; "$PY" -m pip wheel -q --no-deps -w .whl "$sd" && rm "$sd"; done
ds_version=$("$PY" -c "import importlib.metadata as m; print(m.version('deepspeed'))" 2>/dev/null || echo "")
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed${ds_version:+==$ds_version}"
ls -la .whl
