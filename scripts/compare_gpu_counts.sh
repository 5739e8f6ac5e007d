#!/usr/bin/env bash
# One GPU against two, same global batch, on a host with 2 GPUs: the BiLSTM report config (or CONFIG) trained
#   - on one GPU, once per seed (the seeds' runs side by side, one per GPU, to measure run-to-run noise), then
#   - on two GPUs (DDP over NCCL) with batch_size halved per process, so each optimizer step sees the same
#     global batch, once per seed; and, if time allows (EXTRA=1), with the full batch per process (global 2x).
# Every best checkpoint is scored with `sentiment evaluate`; scripts/compare_runs.py tabulates the runs.
#
#   sentiment prepare --config configs/bilstm.yaml --dataset ../shared/data/imdb --output_dir prepared/imdb
#   scripts/compare_gpu_counts.sh prepared/imdb results/2gpu
set -euo pipefail
prepared=${1:?usage: $0 PREPARED_DIR RESULTS_DIR}
results=${2:?usage: $0 PREPARED_DIR RESULTS_DIR}
config=${CONFIG:-configs/bilstm.yaml}
seeds=(${SEEDS:-42 43})
python=${PYTHON:-python3}
batch=$("$python" -c "from sentiment.config import build_config; print(build_config('$config').batch_size)")
mkdir -p "$results" runs
train() {  # NAME "ACCELERATE ARGS" "TRAINER FLAGS"
  local name=$1 start
  start=$(date +%s)
  # shellcheck disable=SC2086
  accelerate launch $2 scripts/train.py --config "$config" --prepared "$prepared" --output_dir "runs/$name" \
    --overwrite --report_to=none $3 ${TRAIN_FLAGS:-} 2>&1 | tr '\r' '\n' | grep -v -E '(it|s)/(s|it)' > "$results/$name.log"
  echo "wall seconds: $(( $(date +%s) - start ))" >> "$results/$name.log"
  "$python" -m sentiment.cli evaluate --model "runs/$name/best" --prepared "$prepared" \
    --output "$results/$name.evaluate.json" >> "$results/$name.log" 2>&1
  cp "runs/$name/metrics.json" "$results/$name.metrics.json"
}
names=()
gpu=0
for seed in "${seeds[@]}"; do  # one-GPU runs, in parallel, one per GPU
  CUDA_VISIBLE_DEVICES=$gpu train "1gpu-seed$seed" "--num_processes 1" "--seed=$seed" &
  names+=("1gpu-seed$seed"); gpu=$(( (gpu + 1) % 2 ))
  if (( gpu == 0 )); then wait; fi
done
wait
for seed in "${seeds[@]}"; do
  train "2gpu-seed$seed" "--multi_gpu --num_processes 2" "--seed=$seed --batch_size=$(( batch / 2 ))"
  names+=("2gpu-seed$seed")
done
if [[ ${EXTRA:-0} == 1 ]]; then
  train "2gpu-seed${seeds[0]}-batch$batch" "--multi_gpu --num_processes 2" "--seed=${seeds[0]}"
  names+=("2gpu-seed${seeds[0]}-batch$batch")
fi
"$python" scripts/compare_runs.py "${names[@]/#/runs/}" | tee "$results/compare.md"
