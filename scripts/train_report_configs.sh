#!/usr/bin/env bash
# Train the report's two chosen configs (configs/lstm.yaml, configs/bilstm.yaml) from a prepared data folder,
# evaluate each best checkpoint with `sentiment evaluate` on the same test split, and collect each run's
# metrics.json, curves.png, evaluation and log into RESULTS_DIR.
#
#   sentiment prepare --config configs/bilstm.yaml --dataset ../shared/data/imdb --output_dir prepared/imdb
#   scripts/train_report_configs.sh prepared/imdb results/h200 [extra --key=value flags]
set -euo pipefail
prepared=${1:?usage: $0 PREPARED_DIR RESULTS_DIR [--key=value ...]}
results=${2:?usage: $0 PREPARED_DIR RESULTS_DIR [--key=value ...]}
shift 2
mkdir -p "$results"
for name in bilstm lstm; do
  start=$(date +%s)
  accelerate launch --num_processes 1 scripts/train.py --config "configs/$name.yaml" --prepared "$prepared" \
    --output_dir "runs/report-$name" --overwrite --report_to=none "$@" 2>&1 | tr '\r' '\n' | grep -v -E '(it|s)/(s|it)' \
    | tee "$results/$name.log"
  echo "wall seconds: $(( $(date +%s) - start ))" | tee -a "$results/$name.log"
  cp "runs/report-$name/metrics.json" "$results/$name.metrics.json"
  cp "runs/report-$name/curves.png" "$results/$name.curves.png"
  "${PYTHON:-python3}" -m sentiment.cli evaluate --model "runs/report-$name/best" --prepared "$prepared" \
    --output "$results/$name.evaluate.json" | tee -a "$results/$name.log"
done
