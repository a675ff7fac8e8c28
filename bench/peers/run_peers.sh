#!/usr/bin/env bash
# Runs the Python peers of Warren's benchmark (Celery, Dramatiq) on the local broker and prints
# their table.
#
#   bench/peers/run_peers.sh [options] RESULTS.jsonl
#
#   --jobs N               jobs per measurement (default 10000)
#   --big                  100,000 jobs per measurement
#   --runs R               runs of each configuration (default 3); runs are interleaved
#   --systems LIST         celery,dramatiq (default both)
#   --queue-types LIST     quorum,classic (default both)
#   --celery-pools LIST    Celery worker pools as POOL[:CONCURRENCY], e.g. prefork:2,solo,threads:8
#                          (default prefork:2,solo,threads:8; gevent:N is possible too)
#   --celery-prefetch M    worker_prefetch_multiplier (default 4, Celery's default)
#   --dramatiq-threads T   Dramatiq worker threads (default 8, Dramatiq's default)
#
# Each run of a configuration measures, on fresh uniquely named queues that it deletes afterwards:
# enqueue (N confirmed submits), drain (one worker process on the N queued jobs), idle-rss and e2e
# (submitting and draining at once). One JSON object per measurement is APPENDED to RESULTS.jsonl
# (see celery_bench.py / dramatiq_bench.py for the fields); the table covers this invocation only.
# The broker: amqp://guest:guest@127.0.0.1:5672/%2f and its management API on :15672, unless
# WARREN_AMQP_URL / WARREN_MANAGEMENT_URL say otherwise.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
JOBS=10000
RUNS=3
SYSTEMS=celery,dramatiq
QTYPES=quorum,classic
CELERY_POOLS=prefork:2,solo,threads:8
CELERY_PREFETCH=4
DRAMATIQ_THREADS=8
RESULTS=
while (($#)); do
    case $1 in
        --jobs) JOBS=$2; shift 2 ;;
        --big) JOBS=100000; shift ;;
        --runs) RUNS=$2; shift 2 ;;
        --systems) SYSTEMS=$2; shift 2 ;;
        --queue-types) QTYPES=$2; shift 2 ;;
        --celery-pools) CELERY_POOLS=$2; shift 2 ;;
        --celery-prefetch) CELERY_PREFETCH=$2; shift 2 ;;
        --dramatiq-threads) DRAMATIQ_THREADS=$2; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "run_peers: unknown option $1" >&2; exit 2 ;;
        *) [[ -z $RESULTS ]] || { echo "run_peers: one results file only" >&2; exit 2; }
           RESULTS=$1; shift ;;
    esac
done
[[ -n $RESULTS ]] || { echo "usage: run_peers.sh [options] RESULTS.jsonl (--help)" >&2; exit 2; }
[[ $JOBS =~ ^[0-9]+$ && $JOBS -ge 1 && $RUNS =~ ^[0-9]+$ && $RUNS -ge 1 ]] ||
    { echo "run_peers: --jobs and --runs take positive numbers" >&2; exit 2; }

PY=$("$HERE/setup.sh")
mkdir -p "$(dirname "$RESULTS")"
THIS_RUN=$(mktemp "${TMPDIR:-/tmp}/peers-results.XXXXXX")
WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/peers-work.XXXXXX")
trap 'rm -f "$THIS_RUN"' EXIT

configs=()
IFS=, read -ra systems <<<"$SYSTEMS"
IFS=, read -ra qtypes <<<"$QTYPES"
IFS=, read -ra pools <<<"$CELERY_POOLS"
for qtype in "${qtypes[@]}"; do
    for system in "${systems[@]}"; do
        case $system in
            celery)
                for pool in "${pools[@]}"; do
                    name=${pool%%:*}
                    conc=${pool#*:}; [[ $pool == *:* ]] || conc=2
                    configs+=("celery_bench.py --queue-type $qtype --pool $name --concurrency $conc --prefetch-multiplier $CELERY_PREFETCH")
                done ;;
            dramatiq) configs+=("dramatiq_bench.py --queue-type $qtype --threads $DRAMATIQ_THREADS") ;;
            *) echo "run_peers: unknown system $system" >&2; exit 2 ;;
        esac
    done
done

failed=0
for ((run = 1; run <= RUNS; run++)); do
    for config in "${configs[@]}"; do
        echo "run_peers: run $run/$RUNS: $config --jobs $JOBS" >&2
        # shellcheck disable=SC2086 # config is a word list
        if ! "$PY" "$HERE"/$config --jobs "$JOBS" --phase all --json "$THIS_RUN" \
            --workdir "$WORKDIR" >/dev/null; then
            echo "run_peers: FAILED: $config (worker logs in $WORKDIR)" >&2
            failed=$((failed + 1))
        fi
    done
done

cat "$THIS_RUN" >>"$RESULTS"
echo
echo "Python peers, $JOBS jobs, $RUNS run(s) each, $(nproc) cores ($(date -u +%FT%TZ)); appended to $RESULTS"
"$PY" "$HERE/summarize.py" "$THIS_RUN"
if ((failed)); then
    echo "run_peers: $failed run(s) failed" >&2
    exit 1
fi
rm -rf "$WORKDIR"
