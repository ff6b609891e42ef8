#!/usr/bin/env bash
# run-fuzz.sh BUILD_DIR SECONDS TARGET... - run each libFuzzer target
# (BUILD_DIR/fuzz_<TARGET>, built with -DSOFTCXI_FUZZ=ON) for SECONDS on a
# temporary copy of csrc/fuzz/corpus/<TARGET>: libFuzzer adds what it finds
# to the copy, never to the committed corpus.  Crashes, leaks and timeouts
# are kept in BUILD_DIR/fuzz-artifacts/ (copy one into the corpus, with a
# fix, to make it a regression test).
#
# Prints one line per target and ends with "fuzz: N passed, N failed,
# E executions"; exits non-zero when a target failed.
set -uo pipefail
build=$1 secs=$2
shift 2
src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
art="$build/fuzz-artifacts"
mkdir -p "$art"
passed=0 failed=0 total=0
for t in "$@"; do
    bin="$build/fuzz_$t"
    if [ ! -x "$bin" ]; then
        echo "fuzz $t: FAILED (no $bin)"; failed=$((failed + 1)); continue
    fi
    work=$(mktemp -d "${TMPDIR:-/tmp}/softcxi-fuzz-$t.XXXXXX")
    cp -r "$src/corpus/$t/." "$work/"
    log="$art/$t.log"
    # rss_limit: a leak or a runaway allocation is a finding, not a hang;
    # timeout: no input may take seconds.
    "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$art/$t-" "$work" >"$log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    runs=${runs:-0}
    cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
    new=$(($(ls "$work" | wc -l) - $(ls "$src/corpus/$t" | wc -l)))
    rm -rf "$work"
    total=$((total + runs))
    if [ "$rc" -eq 0 ] && [ "$runs" -gt 0 ]; then
        echo "fuzz $t: ok, $runs executions in ${secs}s ($cov, $new new inputs)"
        passed=$((passed + 1))
    else
        echo "fuzz $t: FAILED (exit $rc after $runs executions), log $log:"
        grep -E 'ERROR|SUMMARY|Test unit written|==[0-9]+==' "$log" | head -8 | sed 's/^/    /'
        failed=$((failed + 1))
    fi
done
echo "fuzz: $passed passed, $failed failed, $total executions"
[ "$failed" -eq 0 ]
