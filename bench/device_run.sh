#!/usr/bin/env bash
# One call on the GPU machine: build the extension, run the GPU tests, the benchmarks and tuning sweeps,
# and leave everything under $OUT (logs, results JSON, bundle.tar.gz).
#
#   bash bench/device_run.sh [stage ...]      default stages: build tests bench
#   stages: build | tests | tests:<pytest -k expr> | bench | bench:<suite>[,<suite>] | tune:<name> | cmd:<shell>
#
# Carry missing wheels (nvtx) in .whl/; they are installed to /tmp/site first. NVLink multicast stays off.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pykernels-out}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
status=0
ncmd=0  # cmd stages log to cmd1.log, cmd2.log, ...

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME CMD...: run, log to $OUT/logs/NAME.log, print the tail, remember failures
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name: $*"
  "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/logs/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - start)) s"
  [ $rc -eq 0 ] || status=1
}

[ $# -gt 0 ] || set -- build tests bench
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee "$OUT/logs/gpu.txt"
for stage in "$@"; do
  case $stage in
    build) step build env PYKERNELS_BUILD_EXT=1 python3 -m pip install -v --no-build-isolation --no-deps -e . ;;
    tests) step tests python3 -m pytest -m "gpu or multigpu" -q --timeout 300 -p no:cacheprovider tests ;;
    tests:*) step "tests-${stage#tests:}" python3 -m pytest -q --timeout 600 tests -k "${stage#tests:}" ;;
    bench) step bench python3 -m bench --json "$OUT/bench.json" ;;
    bench:*) step "bench-${stage#bench:}" python3 -m bench ${stage#bench:} --json "$OUT/bench-${stage#bench:}.json" ;;
    tune:*) step "tune-${stage#tune:}" python3 -m "bench.tune_${stage#tune:}" --out "$OUT/tune-${stage#tune:}.json" ;;
    cmd:*) ncmd=$((ncmd + 1)); step "cmd$ncmd" bash -c "${stage#cmd:}" ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
done

mkdir -p "$OUT/results" && cp -r bench/results/. "$OUT/results/" 2>/dev/null
[ -d profiles/results ] && cp -r profiles/results "$OUT/profiles-results"
tar -C "$OUT" -czf "$OUT/bundle.tar.gz" logs results $( [ -d "$OUT/profiles-results" ] && echo profiles-results ) \
  $(cd "$OUT" && ls *.json 2>/dev/null)
exit $status
