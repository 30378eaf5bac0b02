#!/usr/bin/env bash
# A/B of two or more commits in one run: a benchmark script runs from each commit's tree in fresh processes,
# alternating between the trees, so that every tree meets the same machine states. On the H100 hosts the speed of
# the CPU side varies from process to process (launch-bound cases by up to 1.5x), so one process per tree is not
# enough; compare the distributions.
# Usage, from the repository root:
#   bash bench/compare_revisions.sh export REV [REV ...]   # here: trees of gradreg/ and bench/ in bench/.revs/REV
#                                                          # (replaces any earlier export)
#   bash bench/compare_revisions.sh run ROUNDS SCRIPT [ARGS ...]   # there (carry bench/.revs): every tree, ROUNDS times
# The trees run in one order in odd rounds and in the reverse order in even ones. Every tree gets the same ARGS, so
# read the printed tables (an --out or --json file would keep only the last process's).
# Example: export 2869c98^ HEAD, then on the GPU machine:
#   bash bench/compare_revisions.sh run 4 bench/scorers.py --device cuda --scorers purview --skip-loops
set -euo pipefail
root=bench/.revs
case "${1:-}" in
  export)
    shift
    rm -rf "$root"
    for rev in "$@"; do
      name=$(git rev-parse --short "$rev")
      mkdir -p "$root/$name"
      git archive "$rev" gradreg bench | tar -x -C "$root/$name"
      echo "$rev -> $root/$name"
    done
    ;;
  run)
    rounds=$2 script=$3
    shift 3
    trees=("$root"/*/)
    for ((i = 1; i <= rounds; i++)); do
      order=("${trees[@]}")
      if ((i % 2 == 0)); then
        for ((j = 0; j < ${#trees[@]}; j++)); do order[j]=${trees[${#trees[@]} - 1 - j]}; done
      fi
      for tree in "${order[@]}"; do
        echo "== round $i, tree ${tree%/}"
        # Each script puts its own tree first on sys.path (bench scripts insert their parent checkout).
        PYTHONUNBUFFERED=1 "${PYTHON:-python3}" "$tree$script" "$@"
      done
    done
    ;;
  *)
    echo "usage: $0 export REV [REV ...] | run ROUNDS SCRIPT [ARGS ...]" >&2
    exit 2
    ;;
esac
