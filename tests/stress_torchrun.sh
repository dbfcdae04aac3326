#!/usr/bin/env bash
# flatminima train under torchrun (DDP, 2 gloo processes), N times in a row (default 20): every run must exit 0.
# Before the teardown fix applied to DDP too, 3 runs in 13 ended with rank 1's "terminate called without an
# active exception" (SIGABRT) after every file was written. Run from the repository root:
#   bash tests/stress_torchrun.sh [N] [extra flags, e.g. --fsdp]
set -u
runs=${1:-20}
shift || true
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
passed=0
for i in $(seq 1 "$runs"); do
  port=$((29500 + RANDOM % 1000))
  if python3 -m torch.distributed.run --nproc_per_node 2 --master_port "$port" -m flatminima train \
      --epochs 1 --batch-size 64 --threads 1 --no-progress --optimizer sam --output "$out/run$i" "$@" \
      > "$out/log$i" 2>&1; then
    passed=$((passed + 1))
  else
    echo "run $i failed:"; tail -5 "$out/log$i"
  fi
done
echo "$passed of $runs runs passed"
[ "$passed" -eq "$runs" ]
