#!/bin/sh
# The autoencoders' paper protocol (100 epochs, 5 runs, gate lr x1) for MNIST and
# Fashion-MNIST, on ONE thread at the lowest priority, each into OUT_ROOT/<name>-paper/
# (runs.jsonl, results.md/json, plots, and log.txt). In stages of seeds: by default first
# 3 runs of MNIST, then 3 of Fashion-MNIST, then both up to 5, so that an early stop
# leaves complete 3-run sweeps of both datasets. Resumable: started again, each sweep
# trains only the runs missing from its runs.jsonl (a run cut part-way continues from its
# last finished epoch).
#
#   nohup setsid sh reproduce/paper_protocol.sh [OUT_ROOT] ["SEED STAGES"] >/dev/null 2>&1 &
#
# OUT_ROOT defaults to /work/repro-runs; the seed stages to "3 5". Runs the code of the
# checkout this script sits in (see docs/reproduction/mnist-autoencoder.md).
set -u
CODE=$(cd "$(dirname "$0")/.." && pwd)
OUT_ROOT=${1:-/work/repro-runs}
STAGES=${2:-3 5}
PYTHON=${PYTHON:-/work/main/.venv/bin/python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
export PYTHONPATH="$CODE/src:$CODE"
cd "$CODE" || exit 1
VERSION=$(git -C "$CODE" rev-parse --short HEAD 2>/dev/null || cat "$CODE/COMMIT" 2>/dev/null)
for seeds in $STAGES; do
    for name in mnist-autoencoder fashion-mnist-autoencoder; do
        out="$OUT_ROOT/$name-paper"
        mkdir -p "$out"
        echo "== $(date -Is) $name --seeds $seeds, code $CODE ($VERSION), pid $$" >> "$out/log.txt"
        nice -n 19 "$PYTHON" -m reproduce "$name" --protocol paper --threads 1 --seeds "$seeds" \
            --out "$out" >> "$out/log.txt" 2>&1 \
            || { rc=$?; echo "== $(date -Is) $name failed (exit $rc)" >> "$out/log.txt"; exit "$rc"; }
        echo "== $(date -Is) $name --seeds $seeds done" >> "$out/log.txt"
    done
done
