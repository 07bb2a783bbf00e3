#!/usr/bin/env bash
# A probe after run.sh: at 8 s K-FAC's sequence runs reach Adam's best eval_loss but end far above it, so search
# K-FAC and Adam again with `search.objective: best` (the recipe stops where its curve was best) and compare the
# two on the same 5 fresh seeds.   benchmarks/strangers/run_best.sh [OUT]   (~8 min; OUT/sequence_8s_best/)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-/tmp/strangers-out}/sequence_8s_best
python=${PYTHON:-python}
kfac_tune() { PYTHONPATH="$repo" "$python" "$repo/cli.py" "$@"; }
mkdir -p "$out"
cd "$here/sequence"
for opt in kfac adam; do
  kfac_tune search sequence_8s.yaml --optimizer "$opt" --study "best-$opt" --set search.objective=best \
    --storage "sqlite:///$out/strangers.db" --no-tracking -o "$out/best-$opt.yaml" --force -f json \
    > "$out/search-$opt.json" 2> "$out/search-$opt.log"
done
kfac_tune compare sequence_8s.yaml --recipes "$out/best-kfac.yaml" "$out/best-adam.yaml" --seeds 5 \
  --set training.seed=100 --set search.objective=best --no-tracking -o "$out" -f json > "$out/compare.json" 2> "$out/compare.log"
