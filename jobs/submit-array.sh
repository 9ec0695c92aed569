#!/bin/bash
# Submit a cohort as a job array of SHARDS tasks plus the gather job that runs after all of them
# (afterany: a failed or timed-out shard still gets its finished subjects gathered).
#
#   KNEEBATCH_MODEL=/shared/models/model3d_state_dict.pth jobs/submit-array.sh cohort.csv OUT [SHARDS [TASKS]]
# TASKS resubmits only those shards of the SHARDS-shard array (e.g. 3,7: the failed ones, from
# `sacct -j ARRAY_ID -X --format=JobID,State`); finished subjects are skipped, and a gather follows.
# Extra sbatch options for both jobs go in SBATCH_OPTIONS, e.g. SBATCH_OPTIONS="-p short -A lab".
# Prints the two job ids: ARRAY_ID GATHER_ID.
set -euo pipefail
MANIFEST=${1:?usage: submit-array.sh MANIFEST OUT [SHARDS [TASKS]]}
OUT=${2:?usage: submit-array.sh MANIFEST OUT [SHARDS [TASKS]]}
SHARDS=${3:-10}
TASKS=${4:-0-$((SHARDS - 1))}
: "${KNEEBATCH_MODEL:?set KNEEBATCH_MODEL to the model file written by kneebatch build-model}"
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
# shellcheck disable=SC2086
ARRAY_ID=$(sbatch --parsable ${SBATCH_OPTIONS:-} --array="$TASKS" \
  "$HERE/cohort-array.sbatch" "$MANIFEST" "$OUT" "$SHARDS")
# shellcheck disable=SC2086
GATHER_ID=$(sbatch --parsable ${SBATCH_OPTIONS:-} --dependency="afterany:${ARRAY_ID%%;*}" \
  "$HERE/gather.sbatch" "$OUT")
echo "$ARRAY_ID $GATHER_ID"
