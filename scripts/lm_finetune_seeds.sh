#!/usr/bin/env bash
# Pretrain a language model on every visible GPU (DDP; one process on a machine without GPUs), then fine-tune a
# classifier from it once per seed, the seeds spread over the GPUs (one run per GPU at a time), and collect the
# language model's and each run's metrics.json, curves and log into RESULTS_DIR.
#
#   sentiment prepare --config configs/pretrain_lm_large.yaml --dataset ../shared/data/imdb --output_dir prepared/imdb-lm-400
#   scripts/lm_finetune_seeds.sh configs/pretrain_lm_large.yaml configs/lstm_lm_large.yaml prepared/imdb-lm-400 \
#     results/lm-large 42 43 44
#
# LM_FLAGS and TRAIN_FLAGS add --key=value flags to the pretraining and to every fine-tuning run.
# The pretraining's batch_size is per process: on N GPUs, LM_FLAGS=--batch_size=$((128 / N)) keeps
# configs/pretrain_lm_large.yaml's global batch. LM_FLAGS=--reverse=true TRAIN_FLAGS=--reverse=true gives ULMFiT's
# backward model (then python scripts/ensemble.py on a forward and a backward run folder).
set -euo pipefail
usage="usage: $0 LM_CONFIG CLASSIFIER_CONFIG PREPARED_DIR RESULTS_DIR [SEED ...]"
lm_config=${1:?$usage}
classifier_config=${2:?$usage}
prepared=${3:?$usage}
results=${4:?$usage}
shift 4
seeds=("${@:-42}")
runs=${RUNS_DIR:-runs}
python=${PYTHON:-python3}
mkdir -p "$results"
quiet() { tr '\r' '\n' | grep -v -E '[0-9](it/s|s/it)\]' || true; }

gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
slots=$(( gpus > 1 ? gpus : 1 ))  # processes for pretraining, fine-tuning runs at a time
launch=("$python" -m accelerate.commands.launch --num_processes "$slots" --num_machines 1 --dynamo_backend no)
if (( gpus > 1 )); then launch+=(--multi_gpu); fi
start=$(date +%s)
# shellcheck disable=SC2086
"${launch[@]}" -m sentiment.cli pretrain --config "$lm_config" --prepared "$prepared" --output_dir "$runs/lm" \
  --overwrite ${LM_FLAGS:-} 2>&1 | quiet > "$results/pretrain.log"
echo "pretraining wall seconds: $(( $(date +%s) - start ))" >> "$results/pretrain.log"
cp "$runs/lm/metrics.json" "$results/pretrain.metrics.json"
cp "$runs/lm/config.yaml" "$results/pretrain.config.yaml"

finetune() {  # seed gpu
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=$2 "$python" scripts/train.py --config "$classifier_config" --prepared "$prepared" \
    --init_from "$runs/lm/best" --seed "$1" --output_dir "$runs/finetune-$1" --overwrite --report_to=none \
    ${TRAIN_FLAGS:-} 2>&1 | quiet > "$results/finetune-$1.log"
  cp "$runs/finetune-$1/metrics.json" "$results/finetune-$1.metrics.json"
  cp "$runs/finetune-$1/curves.png" "$results/finetune-$1.curves.png"
}
pids=()
for index in "${!seeds[@]}"; do
  finetune "${seeds[$index]}" $(( index % slots )) &
  pids+=($!)
  if (( ${#pids[@]} == slots )); then
    for pid in "${pids[@]}"; do wait "$pid"; done
    pids=()
  fi
done
for pid in "${pids[@]}"; do wait "$pid"; done
"$python" scripts/compare_runs.py "$runs"/finetune-* | tee "$results/finetune.md"
