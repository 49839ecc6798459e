#!/usr/bin/env bash
# A claim scenario run RUNS times beside a CPU hog (one busy process per core), counting
# overshoots (an (N + 1)-th trial: N + 1 finished, or one told FAIL 'surplus') and other
# failures:
#   postgres (default): 3 workers on PostgreSQL, one SIGKILLed mid-trial, exactly N finished
#                       (tools/postgres.sh starts the server);
#   sqlite:             6 workers on one SQLite file, exactly N trials ever started.
#   bash tools/stress_kill.sh 30 [postgres|sqlite]   # -> "stress ... runs=30 passed=.. overshoot=.. other=.."
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-30}
scenario=${2:-postgres}
case "$scenario" in
  postgres) tests=(tests/test_distributed.py -k test_postgres_worker_killed_mid_trial_is_retried_from_its_folds)
            overshot() { grep -q "assert len(finished) == TRIALS" "$1" && grep -qE "assert [0-9]+ == [0-9]+" "$1"; } ;;
  sqlite)   tests=(tests/test_many_workers.py)
            overshot() { grep -q "surplus\|len(trials) == TRIALS" "$1"; } ;;
  *) echo "usage: bash tools/stress_kill.sh [RUNS] [postgres|sqlite]" >&2; exit 2 ;;
esac
# shellcheck source=setup.sh
source tools/setup.sh
ensure_python dev "core, search, optuna, pytest"
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
  if "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}" >"$log" 2>&1; then
    passed=$((passed + 1))
  elif overshot "$log"; then
    overshoot=$((overshoot + 1)); cp "$log" "/tmp/stress_overshoot_$i.log"
  else
    other=$((other + 1)); cp "$log" "/tmp/stress_other_$i.log"
  fi
  rm -f "$log"
  echo "run $i: passed=$passed overshoot=$overshoot other=$other"
done
echo "stress $scenario runs=$runs passed=$passed overshoot=$overshoot other=$other"
