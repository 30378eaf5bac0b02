#!/usr/bin/env bash
# Every GPU benchmark of docs/benchmarks.md in one run (plus the CUDA-only tests, -m gpu), results in $OUT.
# Usage from the repository root: OUT=bench/results/gpu bash bench/gpu_all.sh [all|steps|scorers]
# "steps" runs only the tests, the training-step tables and the step profile (about 9 minutes on an H100); "scorers"
# the tests, the scorer tables (contiguous, and channels-last for three scorers), purview's per-layer engines,
# GAIA-Z's reductions (about 5 minutes on an H200) and three torchvision transformer-era models (not yet timed
# there). The whole script takes longer than one device call of 10 minutes.
# The tests run in one process (-o addopts=""): the GPU machine has pytest but not pytest-xdist.
# (bench/results/h100_* and h200_* are the files of such runs on an H100 and an H200, renamed with that prefix.)
# The BackPACK baseline of bench/scorers.py runs if backpack is importable; for a machine without network,
# install it beside the checkout first: pip install --no-deps --target bench/.deps backpack-for-pytorch einops unfoldNd
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
PART=${1:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.:bench/.deps
py=${PYTHON:-python3}
if ! "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "bench/gpu_all.sh needs a CUDA GPU, and $py sees none; the CPU commands are in docs/benchmarks.md" >&2
  exit 2
fi
# Most important first, so that a run cut short still returns them (bench/train_step.py writes its files after every
# model and precision); every table is also printed to log.txt (8 files in all: as many as one device call brings back).
steps() {
  # greg_native, greg_native_conv (PyTorch's double backward) and greg_eager_bn are left out to save device time:
  # measured at commits 8552526 and 80e1397 (bench/results/h100_train_step*.md). The replayed steps run in a process
  # of their own: ResNet-50's two graph memory pools beside the eager steps' cache ran out of memory on an H100.
  $py bench/train_step.py --device cuda --methods energy_graph greg_graph --json "$OUT/train_step_graph.json"
  $py bench/train_step.py --device cuda --methods ce energy greg --json "$OUT/train_step.json"
  # DDP's sync_batchnorm layers on their multi-rank path in a process group of one (docs/benchmarks.md)
  $py bench/train_step.py --device cuda --methods energy greg greg_sync --json "$OUT/train_step_sync.json"
  $py bench/train_step.py --device cuda --channels-last off --model wrn40_2:128:256:32 \
    --methods energy greg energy_graph greg_graph --json "$OUT/train_step_contiguous.json"
  # Profile of one step: WRN-40-2 under bf16, channels-last (eager GReg is launch-bound there, the replay is not).
  $py bench/train_step.py --device cuda --repeats 2 --model wrn40_2:128:256:32 --precision bf16 --channels-last on \
    --methods energy greg greg_graph --profile "$OUT/profile.txt"
}
kernels() {
  # Both kernel tables go to one file (kernels.md): the convolution double backward per layer (contiguous only, to
  # keep cuDNN's autotuning of 33 layer shapes x 2 dtypes short), then BatchNorm's double backward per layer.
  $py bench/conv_kernels.py --device cuda --layout contiguous --out "$OUT/kernels.md"
  $py bench/batchnorm_kernels.py --device cuda --out "$OUT/kernels_part.md" && cat "$OUT/kernels_part.md" >> "$OUT/kernels.md"
  rm -f "$OUT/kernels_part.md"
}
scorers() {
  $py bench/scorers.py --device cuda --json "$OUT/scorers.json"
  # The layout the configs evaluate in, for the scorers whose cost depends on it (about 30 s).
  $py bench/scorers.py --device cuda --channels-last --skip-loops --scorers purview gaia_z odin --count-ops \
    --json "$OUT/scorers_channels_last.json"
  $py bench/purview_engines.py --device cuda --out "$OUT/purview_engines.md"
  $py bench/gaia_reduction.py --device cuda --out "$OUT/gaia_z_reduction.md"
  # Models where torch.func takes some of purview's layers: do the hooks still beat method="vmap" on a GPU? (On a
  # 2-thread CPU they did not: bench/results/cpu_scorers_torchvision.md.)
  $py bench/scorers.py --device cuda --model torchvision.vit_b_16:64:224 --model torchvision.swin_t:64:224 \
    --model torchvision.convnext_tiny:64:224 --scorers energy gradnorm odin purview --loop-samples 8 \
    --json "$OUT/scorers_torchvision.json"
}
{
  nvidia-smi -L
  $py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  $py -m pytest -q -o addopts="" -p no:cacheprovider -m gpu tests/test_cuda_graph.py tests/test_double_backward.py \
    tests/test_module.py tests/test_samplers.py tests/test_scorers.py
  case "$PART" in
    steps) steps ;;
    scorers) scorers ;;
    *) steps; kernels; scorers; $py bench/sampler.py --repeats 20 --warmup 3 --out "$OUT/sampler.json" ;;
  esac
} 2>&1 | tee "$OUT/log.txt"
