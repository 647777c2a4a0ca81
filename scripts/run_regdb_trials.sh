#!/usr/bin/env bash
# Trains and evaluates RegDB's ten trials (one model each, as every published RegDB result), then
# writes their mean and standard deviation to ROOT/eval/regdb.json.
#
#   scripts/run_regdb_trials.sh ROOT [PRESET] [FLAGS...]
#
# ROOT/trial_<t> is each trial's workdir (rerunning resumes unfinished trials); PRESET is a
# configs/regdb.py preset (default paper); FLAGS go to every run, e.g.
#   scripts/run_regdb_trials.sh runs/regdb paper --config.data.manual_dir=/data/RegDB
# TRIALS="1 2" runs a subset; PYTHON picks the interpreter (default: python); CONFIG picks the
# config file in configs/ (default regdb.py; agw_regdb.py for the AGW baseline).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ $# -lt 1 ]]; then
  echo "usage: $0 ROOT [PRESET] [FLAGS...]" >&2
  exit 2
fi
root=$1
preset=${2:-paper}
shift $(( $# < 2 ? $# : 2 ))
python=${PYTHON:-python}
reports=()
for trial in ${TRIALS:-1 2 3 4 5 6 7 8 9 10}; do
  echo "== RegDB trial ${trial}" >&2
  "$python" -m mmreid_jax.main --config "${repo}/configs/${CONFIG:-regdb.py}:${preset},${trial}" \
      --workdir "${root}/trial_${trial}" "$@"
  reports+=("${root}/trial_${trial}/eval/regdb.json")
done
"$python" "${repo}/scripts/aggregate_trials.py" --output "${root}/eval/regdb.json" "${reports[@]}"
