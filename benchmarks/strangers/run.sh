#!/usr/bin/env bash
# Workloads that are not the repository's own (issue 26, "Measured on strangers' workloads"), each a user's
# package beside its YAML, run through the CLI as a user would: one search per optimizer with the same trials,
# sampler seed and training seconds per trial, the seeds race choosing the recipe, then `compare` of the four
# recipes on 5 fresh seeds (100..104; the searches and races used seeds 0, 1, 2): once on the YAML's evaluation
# grid, once on a 4x finer one (evaluation is off the clock; the finer grid only resolves the seconds to target).
#   benchmarks/strangers/run.sh [OUT] [DIR/STEM ...]   # OUT: /tmp/strangers-out; default: all four YAMLs
# Raw outputs: OUT/<stem>/{search-<opt>.json,search-<opt>.log,<stem>-<opt>.yaml,compare*.json,compare*.log}, and
# OUT/summary.md (summarize.py). ~10 min for the three 2-s workloads, ~12 for sequence_8s, on a loaded 2-core CPU.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-/tmp/strangers-out}; shift || true
specs=${*:-tabular/tabular sequence/sequence tokens/tokens sequence/sequence_8s}
python=${PYTHON:-python}
kfac_tune() { PYTHONPATH="$repo" "$python" "$repo/cli.py" "$@"; }
for spec in $specs; do
  dir=${spec%/*} w=${spec#*/}
  mkdir -p "$out/$w"
  cd "$here/$dir"
  recipes=()
  for opt in kfac adam adamw muon; do
    kfac_tune search "$w.yaml" --optimizer "$opt" --study "$w-$opt" --storage "sqlite:///$out/$w/strangers.db" \
      --no-tracking -o "$out/$w/$w-$opt.yaml" --force -f json > "$out/$w/search-$opt.json" 2> "$out/$w/search-$opt.log"
    recipes+=("$out/$w/$w-$opt.yaml")
  done
  kfac_tune compare "$w.yaml" --recipes "${recipes[@]}" --seeds 5 --set training.seed=100 --no-tracking \
    -o "$out/$w" -f json > "$out/$w/compare.json" 2> "$out/$w/compare.log"
  fine=$("$python" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['training']['eval_seconds'] / 4)" "$w.yaml")
  kfac_tune compare "$w.yaml" --recipes "${recipes[@]}" --seeds 5 --set training.seed=100 --no-tracking \
    --set training.eval_seconds="$fine" -o "$out/$w/fine" -f json > "$out/$w/compare-fine.json" 2> "$out/$w/compare-fine.log"
done
"$python" "$here/summarize.py" "$out" > "$out/summary.md"
