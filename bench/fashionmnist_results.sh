#!/usr/bin/env bash
# Train ce, energy, greg and greg+ (energy_cluster sampling) on Fashion-MNIST with the same seed and budget,
# then evaluate each checkpoint with every scorer. Results: runs/results/<name>-seed<SEED>-001/eval/results.md.
# Usage: SEED=0 bash bench/fashionmnist_results.sh [stream]   (seed_everything, default 0; from scratch: a = greg+,
# b = ce energy greg; fine-tuned from the same seed's ce checkpoint: c = greg+, d = energy greg; default: a+b in
# parallel, then c+d). bench/results_table.py averages the seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 WANDB_MODE=disabled
SEED=${SEED:-0}
COMMON=(--config configs/fashionmnist.yaml --seed_everything "$SEED" --run.root runs/results)
EVAL=(--max-samples 2000 --suites ood robustness --no-plots)
train_eval() {  # name, extra train args...
  local name=$1-seed$SEED; shift
  python train.py "${COMMON[@]}" --run.name "$name" "$@"
  python evaluate.py "runs/results/$name-001" "${EVAL[@]}" --out "runs/results/$name-001/eval"
}
stream_a() { train_eval fmnist-gregplus --model.method greg --data.outlier_batch_size 384 \
                        --model.sampler "{name: energy_cluster, num_clusters: 64, two_way: true}"; }
stream_b() { for m in ce energy greg; do train_eval "fmnist-$m" --model.method "$m" --data.outlier_batch_size 64; done; }
# Fine-tuning protocol of the energy paper: start the OOD-aware methods from the CE checkpoint (same steps, lr 0.01).
FT=(--model.pretrained "runs/results/fmnist-ce-seed$SEED-001/last.ckpt" --model.lr 0.01)
stream_c() { train_eval fmnist-ft-gregplus --model.method greg --data.outlier_batch_size 384 "${FT[@]}" \
                        --model.sampler "{name: energy_cluster, num_clusters: 64, two_way: true}"; }
stream_d() { for m in energy greg; do train_eval "fmnist-ft-$m" --model.method "$m" --data.outlier_batch_size 64 "${FT[@]}"; done; }
case "${1:-all}" in
  a) stream_a ;;
  b) stream_b ;;
  c) stream_c ;;
  d) stream_d ;;
  # wait PID returns the background stream's status (a bare wait would not, and a failed run would exit 0)
  *) stream_a & a=$!; stream_b; wait "$a"; stream_c & c=$!; stream_d; wait "$c" ;;
esac
