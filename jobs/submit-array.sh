#!/bin/bash
# Submit a cohort as a job array of SHARDS tasks plus the gather job that runs after all of them
# (afterany: a failed or timed-out shard still gets its finished subjects gathered).
#
#   KNEEBATCH_MODEL=/shared/models/model3d_state_dict.pth jobs/submit-array.sh cohort.csv OUT [SHARDS]
# Extra sbatch options for both jobs go in SBATCH_OPTIONS, e.g. SBATCH_OPTIONS="-p short -A lab".
# Prints the two job ids: ARRAY_ID GATHER_ID.
set -euo pipefail
MANIFEST=${1:?usage: submit-array.sh MANIFEST OUT [SHARDS]}
OUT=${2:?usage: submit-array.sh MANIFEST OUT [SHARDS]}
SHARDS=${3:-10}
: "${KNEEBATCH_MODEL:?set KNEEBATCH_MODEL to the model file written by kneebatch build-model}"
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
# shellcheck disable=SC2086
ARRAY_ID=$(sbatch --parsable ${SBATCH_OPTIONS:-} --array="0-$((SHARDS - 1))" \
  "$HERE/cohort-array.sbatch" "$MANIFEST" "$OUT")
# shellcheck disable=SC2086
GATHER_ID=$(sbatch --parsable ${SBATCH_OPTIONS:-} --dependency="afterany:${ARRAY_ID%%;*}" \
  "$HERE/gather.sbatch" "$OUT")
echo "$ARRAY_ID $GATHER_ID"
