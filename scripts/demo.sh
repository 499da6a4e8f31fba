#!/usr/bin/env bash
# The quickstart demo (`make demo`): build the bundled digits dataset, train a
# small class-conditional model on it (grayscale, v-prediction), sample 100
# digits with DPM-Solver++(2M) in 20 steps and check them with a classifier
# trained on the real digits. Chosen for quality per minute on a 2-core CPU
# (benchmarks/objectives.md, benchmarks/samplers.md).
#
#   bash scripts/demo.sh [PYTHON]
#
# Rerunning reuses the dataset and the finished (or interrupted) training run.
# DEMO_STEPS overrides the number of training steps.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${1:-python}
STEPS=${DEMO_STEPS:-600}
DATA=data/digits
RUN=runs/demo
SAMPLES=$RUN/samples
EMA=0.995

SIZE=8
# bfloat16 autocast only where the CPU computes it natively (it is emulated, and ~10x slower, elsewhere).
BF16=$("$PY" -c "from improved_diffusion.precision import auto_bf16; print(auto_bf16('cpu'))")
MODEL_FLAGS=(--image_size $SIZE --image_channels 1 --num_channels 64 --num_res_blocks 1 --channel_mult 1,2
             --attention_resolutions "" --class_cond True --num_classes 10)
DIFFUSION_FLAGS=(--diffusion_steps 1000 --noise_schedule cosine --predict_v True)
SAMPLER_FLAGS=(--sampler dpmpp_2m --timestep_respacing logsnr20)
TRAIN_FLAGS=(--lr 2e-3 --batch_size 64 --ema_rate $EMA --max_steps "$STEPS" --log_interval 100
             --save_interval 500 --keep_checkpoints 1 --resume_checkpoint auto --seed 0 --use_bf16 "$BF16")

step() { printf '\n==> %s\n' "$*"; }
started=$SECONDS

step "1/4 building the digits dataset in $DATA"
"$PY" datasets/digits.py --out_dir "$DATA" --image_size $SIZE

step "2/4 training a small class-conditional model for $STEPS steps in $RUN (log: $RUN/log.txt)"
OPENAI_LOGDIR=$RUN "$PY" scripts/image_train.py --data_dir "$DATA" \
    "${MODEL_FLAGS[@]}" "${DIFFUSION_FLAGS[@]}" "${TRAIN_FLAGS[@]}"

step "3/4 sampling 100 digits with DPM-Solver++(2M) (20 steps) from the EMA weights"
MODEL=$(printf '%s/ema_%s_%06d.pt' "$RUN" "$EMA" "$STEPS")
OPENAI_LOGDIR=$SAMPLES "$PY" scripts/image_sample.py --model_path "$MODEL" \
    "${SAMPLER_FLAGS[@]}" --num_samples 100 --batch_size 100 --seed 0

step "4/4 checking the samples with a classifier trained on the real digits"
NPZ=$SAMPLES/samples_100x${SIZE}x${SIZE}x1.npz
"$PY" datasets/check_digits.py "$NPZ" --min_share 0.8

step "done in $((SECONDS - started)) s"
echo "samples: $NPZ"
ls "$SAMPLES"/*.png | sed 's/^/grid:    /'
