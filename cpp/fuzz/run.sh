#!/usr/bin/env bash
# run.sh BUILD_DIR SECONDS — runs every checkpoint fuzzer built in BUILD_DIR for SECONDS in total
# (split evenly), each on a scratch copy of the seed corpus (cpp/fuzz/corpus/checkpoint, never
# modified) under BUILD_DIR, and prints each one's executions, speed and final coverage.
# Exits non-zero when a fuzzer finds a crash; the input is kept under BUILD_DIR/artifacts/.
set -uo pipefail
build="$1"
total="${2:-30}"
here="$(cd "$(dirname "$0")" && pwd)"
seeds="$here/corpus/checkpoint"
fuzzers=(checkpoint_parse_fuzzer checkpoint_reader_fuzzer)
per=$(( total / ${#fuzzers[@]} ))
(( per < 1 )) && per=1
mkdir -p "$build/artifacts"
# The reader fuzzer's scratch file: in memory (/dev/shm) when possible, removed with its directory
# when this script ends, even after a crash of the fuzzer.
scratch=$(mktemp -d /dev/shm/asteria-fuzz.XXXXXX 2>/dev/null || mktemp -d "$build/scratch.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export ASTERIA_FUZZ_SCRATCH_DIR="$scratch"
status=0
for f in "${fuzzers[@]}"; do
  bin="$build/cpp/fuzz/$f"
  if [[ ! -x "$bin" ]]; then
    echo "fuzz: $bin is missing (build the 'fuzzers' target first)"
    exit 2
  fi
  work="$build/corpus/$f"
  rm -rf "$work"
  mkdir -p "$work"
  cp "$seeds"/* "$work"/
  log="$build/$f.log"
  start=$(date +%s.%N)
  "$bin" "$work" -max_total_time="$per" -timeout=5 -max_len=4096 -print_final_stats=1 \
      -artifact_prefix="$build/artifacts/$f-" >"$log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  execs=$(awk '/stat::number_of_executed_units:/ {print $2}' "$log")
  speed=$(awk '/stat::average_exec_per_sec:/ {print $2}' "$log")
  final=$(grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' "$log" | tail -1)
  cov=$(sed -nE 's/.*cov: ([0-9]+).*/\1/p' <<<"$final")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$final")
  corp=$(sed -nE 's/.* corp: ([0-9]+\/[0-9]+[a-zA-Z]*).*/\1/p' <<<"$final")
  printf '%-26s %6.1fs  %10s execs  %8s exec/s  cov %s  ft %s  corpus %s\n' "$f" \
      "$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')" "${execs:-?}" "${speed:-?}" \
      "${cov:-?}" "${ft:-?}" "${corp:-?}"
  if [[ $rc -ne 0 ]]; then
    echo "fuzz: $f FAILED (exit $rc); the input is under $build/artifacts/, the log in $log:"
    grep -m1 'INFO: Seed' "$log" || true  # reproduces the run: -seed=N
    tail -40 "$log"
    status=1
  fi
done
exit $status
