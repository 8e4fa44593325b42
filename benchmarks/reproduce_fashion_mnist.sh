#!/usr/bin/env bash
# Every run behind docs/RESULTS.md: the paper's Tables 1, 2, 6, 7, 8 (and 9 from their timings) on
# Fashion-MNIST, at the budget of configs/fashion-mnist-*.yaml (3,000 noisy images, 1,000 clean, 40 epochs).
#
#   bash benchmarks/reproduce_fashion_mnist.sh OUT_DIR [PARALLEL] [extra l2b sweep flags, e.g. --device cuda]
#   l2b report OUT_DIR/sym* OUT_DIR/asym40 --out docs/results/all   (the diagnosis folders: see docs/RESULTS.md)
#
# Each job is one resumable `l2b sweep` (a method at a noise rate over its seeds); PARALLEL jobs run at
# once. Rerunning skips finished runs, so an interrupted reproduction continues where it stopped.
set -u
OUT=${1:-sweeps/fashion-mnist}
JOBS=${2:-1}
shift $(( $# >= 2 ? 2 : $# ))
L2B=${L2B:-l2b}
mkdir -p "$OUT"

jobs() {  # output folder, config, method, noise rates, seeds, extra flags; most important first
  for m in l2b ce l2rw ce+clean glc bootstrap-soft distill; do echo "sym40 sym40 $m 0.4 1,2,3"; done
  for m in l2b-alpha0 l2b-convex; do echo "sym40 sym40 $m 0.4 1,2,3"; done
  for m in l2b ce l2rw l2b-alpha0 l2b-convex; do echo "sym20 sym20 $m 0.2 1,2,3"; done
  for m in ce mwnet glc l2rw l2b; do echo "asym40 asym40 $m 0.4 1,2,3"; done
  echo "sym40 sym40 mlc 0.4 1,2,3"; echo "sym20 sym20 mlc 0.2 1,2,3"
  for m in ce l2b l2rw; do echo "diagnosis sym40 $m 0.4 0"; done  # the diagnosis: seed 0 and one change at a time
  for m in l2b l2rw; do echo "cleanbatch500 sym40 $m 0.4 0,1,2,3 --val-batch-size 500"; done
  for r in 0.3 0.5; do for m in l2b ce l2rw ce+clean glc bootstrap-soft distill mlc; do
    echo "sym${r#0.}0 sym${r#0.}0 $m $r 1,2,3"; done; done
  for m in ce+clean glc bootstrap-soft distill; do echo "sym20 sym20 $m 0.2 1,2,3"; done
  echo "sym20 sym20 l2b 0.2 4,5"; echo "sym40 sym40 l2b 0.4 4,5"
  for n in softmax sigmoid; do echo "normalize-$n sym40 l2b 0.4 1,2,3 --normalize $n"; done  # Fig. 3
  for m in l2b mlc; do echo "sym20 sym20 $m 0.1 1,2,3"; done
  echo "sym50 sym50 l2b-convex 0.5 1,2,3"  # the per-sample diagnosis of L2B against the convex mix
  for m in l2b l2rw; do echo "warmup5 sym40 $m 0.4 0,1,2,3 --warmup-epochs 5"; done  # the warm-up diagnosis
  for m in l2b l2rw; do echo "lr0.15 sym40 $m 0.4 0,1,2 --lr 0.15"; echo "epochs80 sym40 $m 0.4 0,1,2 --epochs 80"; done
  for m in ce+clean bootstrap-soft distill; do echo "asym40 asym40 $m 0.4 1,2,3"; done  # the rest of Table 2
  for m in l2b l2rw; do echo "epochs80 sym20 $m 0.2 1,2 --epochs 80"; done  # the 80-epoch reversal at 20%
}

jobs | while read -r dest cfg method rates seeds extra; do
  echo "$L2B sweep --config configs/fashion-mnist-$cfg.yaml --methods $method --noise-rates $rates --seeds $seeds --out $OUT/$dest --quiet ${extra:-} $*"
done | xargs -P "$JOBS" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
ls "$OUT"/*/ | grep -c -- '-s[0-9]' | xargs echo "run folders:"
