#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer (CNNBP_SANITIZE=1, see
# setup.py) in a throwaway copy of this working tree and runs the test suite against that build.
#
#   scripts/sanitize.sh                 # whole suite (slow-marked tests stay deselected)
#   scripts/sanitize.sh tests/test_fuzz.py -k conv2d     # any pytest arguments instead
#   KEEP=1 scripts/sanitize.sh          # keep the copy (its path is printed)
#
# Never builds in the checkout itself: the in-place .so there may be in use by others.
#
# A Python process loads the instrumented extension long after it started, so the ASan runtime has
# to be preloaded: LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)".
# libstdc++ goes right after it because python itself does not link it: without it ASan cannot find
# the real __cxa_throw and aborts ("CHECK failed ... real___cxa_throw") on the first C++ exception,
# i.e. on every TORCH_CHECK that fires. The UBSan runtime comes in as a dependency of the extension. Leak detection is off (ASAN_OPTIONS=detect_leaks=0): CPython and
# libtorch keep allocations alive until exit by design, so LeakSanitizer would report thousands of
# "leaks" that are not ours. UBSan stops at the first report (halt_on_error=1) with a stack trace.
#
# Exit status: 0 when the build succeeded, the tests passed and no sanitizer report was printed.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/cnnbp-sanitize.XXXXXX)"
LOG="$WORK/sanitize.log"
if [[ "${KEEP:-0}" != 1 ]]; then
  trap 'rm -rf "$WORK"' EXIT
fi

echo "== copying $ROOT to $WORK/repo (working tree, uncommitted changes included)"
mkdir -p "$WORK/repo"
tar -C "$ROOT" --exclude=.git --exclude=build --exclude='*.so' --exclude=__pycache__ \
    --exclude=.hypothesis --exclude=.pytest_cache --exclude='*.egg-info' -cf - . | tar -C "$WORK/repo" -xf -
cd "$WORK/repo"

echo "== building with CNNBP_SANITIZE=1 (log: $LOG)"
if ! CNNBP_SANITIZE=1 MAX_JOBS="${MAX_JOBS:-2}" python setup.py build_ext --inplace >"$LOG" 2>&1; then
  tail -50 "$LOG"
  echo "SANITIZE: BUILD FAILED"
  exit 2
fi
SO="$(ls torch_cnnbp/_C*.so)"
if ! ldd "$SO" | grep libasan >/dev/null; then  # (not grep -q: with pipefail, ldd would die of SIGPIPE)
  echo "SANITIZE: $SO is not linked against libasan: the sanitizer flags did not apply"
  exit 2
fi

PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
LOADED="$(LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$WORK/repo${PYTHONPATH:+:$PYTHONPATH}" \
  python -c 'import torch_cnnbp; print(torch_cnnbp._C.__file__)' 2>>"$LOG")"
if [[ "$LOADED" != "$WORK/repo/"* ]]; then
  echo "SANITIZE: the tests would load $LOADED, not the sanitized build in $WORK/repo"
  exit 2
fi
echo "== loads $LOADED"
# The whole suite runs (slow-marked tests stay deselected, as everywhere), except:
#  - tests/test_ddp.py: its spawned gloo workers inherit LD_PRELOAD, and at worker exit PyTorch has
#    a shutdown race: a gloo thread (ProcessGroupGloo::runLoop) destroys a finished work item that
#    holds a Python object after the interpreter began finalizing, pthread_exit unwinds through a
#    noexcept destructor and the worker aborts ("terminate called without an active exception").
#    With ASan's slowdown on a loaded machine that happened in about 1 run in 4; the stack is all
#    libtorch/gloo/CPython, none of it ours. The DDP test passes outside the sanitizers.
# The torch.compile tests (Inductor compiles in subprocesses that inherit LD_PRELOAD) pass under it
# and stay in.
DESELECT=(--ignore=tests/test_ddp.py)
if [[ $# -gt 0 ]]; then
  ARGS=("$@")
else
  ARGS=(tests "${DESELECT[@]}")
fi

echo "== pytest ${ARGS[*]} under ASan+UBSan"
set +e
LD_PRELOAD="$PRELOAD" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:print_summary=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
PYTHONPATH="$WORK/repo${PYTHONPATH:+:$PYTHONPATH}" \
  python -m pytest -q -p no:cacheprovider "${ARGS[@]}" 2>&1 | tee -a "$LOG"
STATUS=${PIPESTATUS[0]}
set -e

REPORTS="$(grep -cE 'ERROR: AddressSanitizer|runtime error:|SUMMARY: (AddressSanitizer|UndefinedBehaviorSanitizer)' "$LOG" || true)"
echo "== pytest exit status: $STATUS; sanitizer reports: $REPORTS"
if [[ "$REPORTS" != 0 ]]; then
  grep -nE -A30 'ERROR: AddressSanitizer|runtime error:' "$LOG" | head -120
fi
if [[ "${KEEP:-0}" == 1 ]]; then echo "== kept $WORK"; fi
if [[ "$STATUS" == 0 && "$REPORTS" == 0 ]]; then
  echo "SANITIZE: CLEAN"
  exit 0
fi
echo "SANITIZE: FAILED"
exit 1
