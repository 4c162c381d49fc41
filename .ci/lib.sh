# Shared by .ci/run and .ci/nightly (sourced, not run): the environment of a CI pass and the timed pass runner.
# docs/testing.md explains the tiers and the budget.

export JAX_PLATFORMS=cpu

# Compile once: one persistent JAX compilation cache for everything this script starts (pytest, the ~50 CLI
# subprocesses, the multi-process tests), so a program compiled by one test or pass is loaded by the next. In a
# temp dir: a fresh clone starts empty, nothing is kept between CI runs. Programs with host callbacks are never
# cached by JAX; the rest are, however short their compile (threshold 0).
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR="$(mktemp -d -t jaxrl_pref_ci_jaxcache.XXXXXX)"
  export JAX_COMPILATION_CACHE_DIR
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0

# Measured, not guessed: every pass prints its slowest tests and why each skipped test skipped.
export PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} --durations=25 -rs"

install_slurm() {
  # a real single-node Slurm for tests/test_slurm.py (root only; without it those tests skip and say why)
  if [ "$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; } >/dev/null \
      || echo "warning: could not install slurm-wlm/munge; the real-Slurm tests will be skipped" >&2
  fi
}

# run_pass NAME LIMIT_SECONDS COMMAND: runs COMMAND (a bash command line) under a time limit. Past the limit the
# pass is interrupted (SIGINT, so pytest still prints its summary; SIGKILL 60 s later), the slowest finished tests
# and the ones still running are printed from the progress log, and the script fails with 124: creep shows up as
# a report, not as CI's hard kill.
# the pass's per-test timings, kept for planning the tiers: ${TMPDIR:-/tmp}/jaxrl_pref_ci_NAME.last.tsv (the newest
# run's; seconds, phase, outcome, test: `awk -F'\t' '$2 != "start" {t[$4] += $1} END {for (n in t) print t[n], n}'`)
_keep_log() {
  mv -f "$2" "${TMPDIR:-/tmp}/jaxrl_pref_ci_$1.last.tsv" 2>/dev/null || rm -f "$2"
}

run_pass() {
  local name="$1" limit="$2" cmd="$3" log rc start
  log="$(mktemp -t "jaxrl_pref_ci_${name}.XXXXXX")"
  start=$(date +%s)
  echo "=== pass '$name' (limit ${limit} s) ==="
  set +e
  PYTEST_PROGRESS_LOG="$log" timeout --signal=INT --kill-after=60 "$limit" bash -c "$cmd"
  rc=$?
  set -e
  echo "=== pass '$name': exit $rc after $(( $(date +%s) - start )) s ==="
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "pass '$name' ran past its limit of ${limit} s. Slowest finished tests (seconds, setup+call+teardown):" >&2
    awk -F'\t' '$2 != "start" { t[$4] += $1 } END { for (n in t) printf "%8.1f  %s\n", t[n], n }' "$log" \
      | sort -rn | head -15 >&2
    echo "still running when it was stopped:" >&2
    awk -F'\t' -v now="$(date +%s)" '$2 == "start" { s[$4] = $1 } $2 == "teardown" { delete s[$4] }
      END { for (n in s) printf "  %s (started %d s before the stop)\n", n, now - s[n] }' "$log" >&2
    _keep_log "$name" "$log"
    return 124
  fi
  _keep_log "$name" "$log"
  # pytest's 5 is "no tests collected": a tier that selects nothing is a broken tier, not a pass
  return "$rc"
}
