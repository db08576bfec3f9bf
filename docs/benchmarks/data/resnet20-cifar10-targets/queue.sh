#!/bin/sh
# ResNet-20 / CIFAR-10 at matched FLOPs budgets (issue 11 item 6), one core, nice 19, in parts
# (one part = one seed x some methods, 1-1.5 h of a shared core); a stopped queue redoes only
# the part it was in. Finished parts are committed beside this file; copy them into $OUT first.
set -u
CODE=${CODE:-/work/repro-runs/code-f23e16c}   # a frozen git archive of the checkout
PY=${PY:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=$CODE/src:$CODE
cd $CODE
R="nice -n 19 $PY -m benchmarks.pruning resnet20-cifar10 --epochs 5 --finetune-epochs 1 --seeds 1 --targets 0.5,0.33,0.2 --no-progress"
for seed in 0 1; do
  for part in "base:dense magnitude chipnet" "budget:dam-budget" "uniform:dam-budget-uniform" "slim:slimming"; do
    name=${part%%:*}; methods=${part#*:}
    out=${OUT:-/work/repro-runs/bench}/r20-t-s$seed-$name
    # results.json is rewritten after every row, so only a finished part counts as done
    if [ -f $out/DONE ]; then echo "skip $out"; continue; fi
    echo "== $(date -Is) seed $seed $name ($methods)" >> ${OUT:-/work/repro-runs/bench}/queue.log
    $R --first-seed $seed --methods $methods --out $out > $out.log 2>&1 && touch $out/DONE
    echo "== $(date -Is) exit $? ($out)" >> ${OUT:-/work/repro-runs/bench}/queue.log
  done
done
