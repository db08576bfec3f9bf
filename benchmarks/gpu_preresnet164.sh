#!/usr/bin/env bash
# The DAM paper's PreResNet-164 / CIFAR-10 run, unchanged (study `preresnet164-cifar10-paper`
# in benchmarks/pruning.py): SGD lr 0.05, momentum 0.9, lr x0.1 at epochs 100 and 150,
# weight decay 1e-3 on the weights (never on beta), batch 128, 200 epochs, beta frozen for
# the first 20 epochs (cold start), lambda 0.2, 45k/5k train/val split, random crop + flip.
# Data: the offline CIFAR-10 JPEG copy (accuracies are not directly comparable with the
# published PNG CIFAR-10). CIFAR-100 is not available offline, so the paper's CIFAR-100
# row cannot be run here.
#
# Needs a CUDA GPU (refuses to start on CPU: 200 epochs of PreResNet-164 would take weeks
# there). Trains DAM only; add `--methods dense dam` for the dense reference (doubles the cost).
# Extra arguments go to benchmarks/pruning.py, e.g. `--seeds 3` or `--out DIR`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_preresnet164.sh: no CUDA device visible to $PYTHON; this recipe is for a GPU" >&2
    exit 2
fi
exec "$PYTHON" -m benchmarks.pruning preresnet164-cifar10-paper --methods dam --device cuda \
    --out runs/bench/preresnet164-cifar10-paper "$@"
