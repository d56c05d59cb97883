#!/usr/bin/env bash
# Train the reranker bundled with shapes-tiny, end to end on CPU, with
# `crossfind train-reranker`, and write it (reranker.safetensors,
# reranker.json, the card's "Reranker" section, train_metrics.json) into OUT
# (default retrieval/models/shapes-tiny/). About 65-70 minutes on two cores
# (timing in docs/benchmarks.md).
#
#   bash scripts/train_shapes_reranker.sh [WORK_DIR [OUT]]
#   RECIPE_SMOKE=1 bash scripts/train_shapes_reranker.sh /tmp/w /tmp/o   # every stage, a few steps, small data
#
# The reranker reads two layers of the frozen vision tower (the patch embedding,
# where colour and place are plain, and the final layer) plus a local stem (an
# MLP over each patch's 3x3 neighbourhood of patch-embedding tokens, hidden
# width 192, last layer at zero): a small object's outline, i.e. its shape.
#
# 1. Relations first: minimal-pair groups only (a scene, its colours swapped,
#    shapes swapped, relation reversed; each image against each caption),
#    canonical captions for 400 steps, then the real ones, 1,200 steps, with
#    an auxiliary loss that reads the shape under each object's centre patch
#    from the stem (weight 0.5; that head is not saved).
# 2. Then everything search puts beside the true item, 600 steps: residual on
#    the dual cosine (weight 40), ordinary scenes in groups of four the dual
#    encoder finds alike, and alike minimal-pair items from different groups.
# 3. The same on twice the data (the first half is stage 2's), 600 steps at a
#    third of the learning rate.
# 4. Choose the dual-cosine weight on fresh validation scenes, calibrate the
#    match probability, evaluate on held-out seeds 11 and 12, write the card.
#
# Why each stage is there, and the longer chains and designs it replaced:
# docs/reranker.md.
set -euo pipefail
cd "$(dirname "$0")/.."
CROSSFIND=${CROSSFIND:-.venv/bin/crossfind}
WORK=${1:-$(mktemp -d -t crossfind-reranker-XXXXXX)}
OUT=${2:-retrieval/models/shapes-tiny}
# Data sizes and steps per stage; RECIPE_SMOKE=1 shrinks them to check every stage runs.
if [[ -n "${RECIPE_SMOKE:-}" ]]; then
    N1=64 N2=64 O2=64 N3=128 O3=128 S1=6 C1=2 S2=4 S3=4 EVAL=(--eval-n 40) EVERY=(--checkpoint-every 2)
else
    N1=30000 N2=30000 O2=15000 N3=60000 O3=30000 S1=1200 C1=400 S2=600 S3=600 EVAL=() EVERY=()
fi
TRAIN=("$CROSSFIND" train-reranker --model shapes-tiny --threads 2 --seed 0 "${EVERY[@]}")
SHAPE=(--image-layer embed+final --words --image-depth 1 --depth 2 --width 128 --heads 4 --local 192 --shape-aux 0.5)
SEARCH=(--residual 40 --mined-groups 24 --alike-groups 16 --batch-size 32)
echo "work folder: $WORK"
SECONDS=0
"${TRAIN[@]}" "shapes:minimal=$N1" "${SHAPE[@]}" --residual off --batch-size 32 --curriculum "$C1" --steps "$S1" \
    --out "$WORK/relations" --no-eval
echo "stage 1 done after $((SECONDS / 60)) min"
"${TRAIN[@]}" "shapes:minimal=$N2,ordinary=$O2" "${SHAPE[@]}" "${SEARCH[@]}" --init "$WORK/relations" --steps "$S2" \
    --out "$WORK/search" --no-eval
echo "stage 2 done after $((SECONDS / 60)) min"
"${TRAIN[@]}" "shapes:minimal=$N3,ordinary=$O3" "${SHAPE[@]}" "${SEARCH[@]}" --init "$WORK/search" --steps "$S3" \
    --lr 3e-4 --out "$WORK/anneal" --no-eval
echo "stage 3 done after $((SECONDS / 60)) min"
"${TRAIN[@]}" shapes: --init "$WORK/anneal" --steps 0 --tune-dual "${EVAL[@]}" --out "$OUT"
echo "trained, calibrated and evaluated in $((SECONDS / 60)) min $((SECONDS % 60)) s"
