#!/usr/bin/env bash
# The signal tests, N times in a row (default 20), while two busy loops keep both cores loaded: the check that
# they synchronise on the program's events and not on timing. Run from the repository root:
#   bash tests/stress_signals.sh [N]
set -u
runs=${1:-20}
python3 -c "while True: pass" & busy1=$!
python3 -c "while True: pass" & busy2=$!
trap 'kill $busy1 $busy2 2>/dev/null' EXIT
passed=0
for i in $(seq 1 "$runs"); do
  if python3 -m pytest -q -p no:cacheprovider \
      tests/test_cli_errors.py::test_sigint_stops_with_a_resume_hint \
      tests/test_train.py::test_killed_run_resumed_ends_with_the_same_weights > /dev/null 2>&1; then
    passed=$((passed + 1))
  else
    echo "run $i failed"
  fi
done
echo "$passed of $runs runs passed"
[ "$passed" -eq "$runs" ]
