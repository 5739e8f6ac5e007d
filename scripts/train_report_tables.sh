#!/usr/bin/env bash
# Reproduce the report's Tables 1 and 2 on its own kind of split (split_scheme: seed, the test set cut 70/30 into
# validation and test): train the four configurations from a prepared folder made with that split, then
# tabulate them next to the report's figures.
#
#   sentiment prepare --config configs/bilstm.yaml --dataset ../shared/data/imdb --split_scheme=seed \
#       --output_dir prepared/imdb-seed
#   scripts/train_report_tables.sh prepared/imdb-seed docs/results/report-tables [extra --key=value flags]
set -euo pipefail
prepared=${1:?usage: $0 PREPARED_DIR RESULTS_DIR [--key=value ...]}
results=${2:?usage: $0 PREPARED_DIR RESULTS_DIR [--key=value ...]}
shift 2
mkdir -p "$results"
declare -A configs=([lstm_part1]=lstm_part1 [lstm_part2]=lstm [bilstm_part1]=bilstm_part1 [bilstm_part2]=bilstm)
for name in lstm_part1 lstm_part2 bilstm_part1 bilstm_part2; do
  accelerate launch --num_processes 1 scripts/train.py --config "configs/${configs[$name]}.yaml" \
    --prepared "$prepared" --output_dir "runs/table-$name" --overwrite --report_to=none "$@" 2>&1 \
    | tr '\r' '\n' | grep -v -E '(it|s)/(s|it)' > "$results/$name.log"
  cp "runs/table-$name/metrics.json" "$results/$name.metrics.json"
done
"${PYTHON:-python3}" scripts/report_tables.py --lstm_part1 runs/table-lstm_part1 --lstm_part2 runs/table-lstm_part2 \
  --bilstm_part1 runs/table-bilstm_part1 --bilstm_part2 runs/table-bilstm_part2 --output "$results/tables.md"
