#!/usr/bin/env bash
# The PostgreSQL kill scenario (3 workers, one SIGKILLed mid-trial, exactly N finished) run RUNS
# times beside a CPU hog (one busy process per core), counting overshoots (N + 1 finished) and
# other failures. Needs PostgreSQL (tools/postgres.sh starts one).
#   bash tools/stress_kill.sh 30        # -> "stress runs=30 passed=.. overshoot=.. other=.."
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-30}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
# shellcheck source=postgres.sh
source tools/postgres.sh
start_postgres >/dev/null
export MASK_SEARCH_PG_URL
hogs=()
for _ in $(seq "$(nproc)"); do "$PYTHON" -c "while True: pass" & hogs+=($!); done
trap 'kill "${hogs[@]}" 2>/dev/null; stop_postgres' EXIT
passed=0 overshoot=0 other=0
for i in $(seq "$runs"); do
  log=$(mktemp)
  if "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_distributed.py \
      -k test_postgres_worker_killed_mid_trial_is_retried_from_its_folds >"$log" 2>&1; then
    passed=$((passed + 1))
  elif grep -q "assert len(finished) == TRIALS" "$log" && grep -qE "assert [0-9]+ == [0-9]+" "$log"; then
    overshoot=$((overshoot + 1)); cp "$log" "/tmp/stress_overshoot_$i.log"
  else
    other=$((other + 1)); cp "$log" "/tmp/stress_other_$i.log"
  fi
  rm -f "$log"
  echo "run $i: passed=$passed overshoot=$overshoot other=$other"
done
echo "stress runs=$runs passed=$passed overshoot=$overshoot other=$other"
