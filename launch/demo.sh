#!/usr/bin/env bash
# `make demo`: the whole pipeline on the embedded data set, offline, on this machine.
#   mock site (synthetic species in mushroom.world markup, with faults) → crawl → verify → stats
#   → data plan → train on 2 CPU processes (eval every epoch, export at the end) → how to look at it.
# Re-running is cheap: the crawl resumes from its ledger and training from its newest checkpoint.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEMO_DIR=${DEMO_DIR:-demo}
PORT=${MOCK_PORT:-8765}
SPECIES=${DEMO_SPECIES:-24}
PER_SPECIES=${DEMO_PER_SPECIES:-100}
EPOCHS=${DEMO_EPOCHS:-8}
mkdir -p "$DEMO_DIR"

echo "== 1/5 local copy of the site: $SPECIES synthetic species x $PER_SPECIES photos, all faults on"
rm -f "$DEMO_DIR/mock-site.url"
# The site's pages name no lookalikes (as mushroom.world's don't): the synthetic species' own pairs are
# written as a lookalike reference and merged into the crawled catalogue with the packaged one.
"$PY" -m mycodist mock-site --port "$PORT" --species "$SPECIES" --per-species "$PER_SPECIES" --size 256 \
    --faults all --ready-file "$DEMO_DIR/mock-site.url" --reference-out "$DEMO_DIR/lookalikes.csv" \
    >"$DEMO_DIR/mock-site.log" 2>&1 &
SITE_PID=$!
trap 'kill $SITE_PID 2>/dev/null || true' EXIT
for _ in $(seq 900); do
    [ -s "$DEMO_DIR/mock-site.url" ] && break
    kill -0 $SITE_PID 2>/dev/null || { cat "$DEMO_DIR/mock-site.log"; exit 1; }
    sleep 0.2
done
[ -s "$DEMO_DIR/mock-site.url" ] || { echo "mock site did not start (see $DEMO_DIR/mock-site.log)"; exit 1; }

echo "== 2/5 crawl it politely into shards"
"$PY" -m mycodist crawl mushroomworld --out "$DEMO_DIR/shards" "crawl.base_url=$(cat "$DEMO_DIR/mock-site.url")" \
    crawl.near_dup=true "catalog.references=[$DEMO_DIR/lookalikes.csv]"
kill $SITE_PID 2>/dev/null || true
wait $SITE_PID 2>/dev/null || true
tail -n 2 "$DEMO_DIR/mock-site.log"

echo "== 3/5 verify the shards, report on them, plan how they stream to 2 ranks"
"$PY" -m mycodist verify "$DEMO_DIR/shards"
"$PY" -m mycodist stats "$DEMO_DIR/shards" --report "$DEMO_DIR/report"
"$PY" -m mycodist data plan "$DEMO_DIR/shards" --world-size 2 --workers 1 train.batch_size=32

echo "== 4/5 train ViT-Tiny/8 at 48 px on 2 CPU processes (eval every epoch, export at the end)"
# Patch 8 at 48 px: 36 patches of 6x6 px, so spots, gills and rings survive; crops keep >= half the photo
# so the mushroom stays in view (docs/results.md has the recipes tried).
"$PY" -m mycodist train --nproc 2 "data.shards=$DEMO_DIR/shards" "train.output_dir=$DEMO_DIR/run" \
    model.name=vit_tiny_patch8 model.img_size=48 train.batch_size=32 "train.epochs=$EPOCHS" train.lr=0.008 \
    "data.scale=[0.5,1.0]" data.workers=1 "catalog.references=[$DEMO_DIR/lookalikes.csv]"
"$PY" -m mycodist.train.curves "$DEMO_DIR/run" "$DEMO_DIR/run/curve.png"

echo "== 5/5 predict three held-out photos with the export (what the web page serves)"
"$PY" - "$DEMO_DIR" <<'PYEOF'
import sys, tarfile, pathlib
demo = pathlib.Path(sys.argv[1]); out = demo / "samples"; out.mkdir(exist_ok=True)
with tarfile.open(sorted((demo / "shards").glob("val-*.tar"))[0]) as tar:
    jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:3]
    for m in jpgs:
        (out / m.name).write_bytes(tar.extractfile(m).read())
PYEOF
"$PY" -m mycodist predict --model "$DEMO_DIR/run/export" "$DEMO_DIR/samples"

echo "== done. Next:"
echo "  web page:    $PY -m mycodist serve --model $DEMO_DIR/run/export   # then open http://127.0.0.1:8080/"
echo "  TensorBoard: .venv/bin/tensorboard --logdir $DEMO_DIR/run/tb --host 127.0.0.1 --port 6006"
