#!/usr/bin/env bash
# bench/heap.sh: memplane's heap benchmarks (issues 4 and 5) against DPDK 22.11, in one run.
#
# Builds (release: cargo's bench profile) the bench binaries of memplane-heap and memplane and
# the DPDK 22.11 C program interop/dpdk_malloc_bench.c, then runs:
#   malloc_perf     DPDK's malloc_perf_autotest protocol on memplane's heap (hugepages and
#                   --no-huge), next to `dpdk-test`'s own malloc_perf_autotest, with ratios;
#   malloc_perf_prealloc  the same on hugepages with 2048 MiB allocated up front on both sides
#                   (--socket-mem 2048): the rows that fit grow nothing (not in the default set);
#   alloc_pairs     alloc+free pairs of 16/64/256 B, working set 16, 1 and 2 threads: memplane's
#                   global allocator (installed: global_pairs; and through GlobalAlloc), jemalloc
#                   (installed: jemalloc_pairs; and through GlobalAlloc), the heap directly,
#                   glibc, mimalloc, DPDK rte_malloc/rte_free, a no-allocator control;
#   memzone_lookup  lookup among 2000 memzones, memplane vs rte_memzone_lookup;
#   page_grow       one 2 MiB page allocated+published and freed, primary (0/1/3 secondaries)
#                   and secondary (0/3 others), memplane vs the kernel floor vs DPDK heap growth.
# and prints every result line plus the tables (markdown).
#
# Placements (memzone_lookup and page_grow run in each; malloc_perf and alloc_pairs float, the
# pairs' two threads being pinned to CPUs 0 and 1 like DPDK's lcores):
#   float = no pinning (memplane's threads and processes go where the kernel puts them; DPDK with
#           --lcores=0@(0-1), so its threads float over both CPUs as well: with -l 0-1 EAL would
#           pin every DPDK thread of these benchmarks to CPU 0);
#   cpu0  = every process under `taskset -c 0`, DPDK with -l 0 (no cross-CPU wake-ups, which cost
#           tens of microseconds on this VM).
#
# Usage: bench/heap.sh [--reps R] [--quick] [--only "malloc_perf alloc_pairs ..."] [--out FILE]
#                      [--placements "float cpu0"] [--no-build] [--no-wait-idle]
#   --reps R        repetitions inside each benchmark (medians are reported); default 3
#                   (alloc_pairs: 31 of its fast rows, R of the heap-direct and DPDK rows)
#   --quick         small counts, one rep (a smoke run)
#   --only LIST     run only these benchmarks (default: all four)
#   --out FILE      also write the tables (markdown) to FILE
#   --placements P  placements for memzone_lookup and page_grow (default "float cpu0")
#   --no-build      use the binaries as built last time
#   --no-wait-idle  do not wait (at most 30 min, before each benchmark) for other benchmarks to
#                   finish and the CPUs to go idle
# Needs root (DPDK's runtime dir /var/run/dpdk, hugepages), cc, pkg-config and libdpdk-dev
# 22.11 (for the DPDK rows; without them those rows are skipped), dpdk-test (Debian package
# dpdk-dev; for the DPDK side of malloc_perf),
# cargo. Every process it starts is stopped, and every runtime dir, DPDK hugepage file and temp
# dir it makes is removed, also on failure or Ctrl-C; hugepages it reserved are given back.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CMDLINE="bench/heap.sh $*"
REPS=3
QUICK=0
ONLY="malloc_perf alloc_pairs memzone_lookup page_grow"
OUT=""
PLACEMENTS="float cpu0"
BUILD=1
WAIT_IDLE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS=$2; shift ;;
    --quick) QUICK=1 ;;
    --only) ONLY=$2; shift ;;
    --out) OUT=$2; shift ;;
    --placements) PLACEMENTS=$2; shift ;;
    --no-build) BUILD=0 ;;
    --no-wait-idle) WAIT_IDLE=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "heap.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$QUICK" = 1 ] && REPS=1

log() { printf '%s\n' "$*" >&2; }
die() { log "heap.sh: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (hugepages, DPDK's runtime directory /var/run/dpdk)"

# ---- cleanup: every process, runtime dir, DPDK file and temp dir we make ---------------------
TMP=$(mktemp -d /tmp/mpbh.XXXXXX)
PREFIX="mpbh$$"                 # DPDK --file-prefix base of everything we start
export MPB_RUNDIR_BASE="$TMP"   # memplane runtime dirs of the benches go in here
export MPB_DPDK_PREFIX="$PREFIX"
PIDS=()                         # the bench processes we started (each leads its own children)
HUGE_BEFORE=""
MOUNTED=0

descendants() { # pid -> every descendant pid, deepest last
  local p c
  for p in "$@"; do
    for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do
      echo "$c"
      descendants "$c"
    done
  done
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local all=()
  for p in "${PIDS[@]}"; do
    if kill -0 "$p" 2>/dev/null; then
      all+=("$p")
      mapfile -t -O "${#all[@]}" all < <(descendants "$p")
    fi
  done
  if [ "${#all[@]}" -gt 0 ]; then
    log "heap.sh: stopping ${#all[@]} process(es) we started: ${all[*]}"
    kill -TERM "${all[@]}" 2>/dev/null || true
    sleep 1
    kill -KILL "${all[@]}" 2>/dev/null || true
  fi
  rm -rf "$TMP"
  rm -rf /var/run/dpdk/"$PREFIX"* 2>/dev/null || true
  rm -f /dev/hugepages/"$PREFIX"* 2>/dev/null || true
  if [ "$MOUNTED" = 1 ]; then umount /dev/hugepages 2>/dev/null || true; fi
  if [ -n "$HUGE_BEFORE" ]; then echo "$HUGE_BEFORE" > /proc/sys/vm/nr_hugepages || true; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- hugepages ------------------------------------------------------------------------------
NR=$(cat /proc/sys/vm/nr_hugepages)
if [ "$NR" -lt 1100 ]; then
  HUGE_BEFORE=$NR
  echo 1100 > /proc/sys/vm/nr_hugepages
  log "heap.sh: reserved 1100 hugepages (was $NR; given back at exit)"
fi
if ! mountpoint -q /dev/hugepages; then
  mkdir -p /dev/hugepages
  mount -t hugetlbfs nodev /dev/hugepages
  MOUNTED=1
fi

# ---- build ----------------------------------------------------------------------------------
DPDK_BIN=""
if command -v cc >/dev/null && pkg-config --exists libdpdk 2>/dev/null; then
  DPDK_VERSION=$(pkg-config --modversion libdpdk)
  case "$DPDK_VERSION" in 22.11*) ;; *) die "DPDK 22.11 wanted, pkg-config finds $DPDK_VERSION" ;; esac
  DPDK_BIN="$TMP/dpdk_malloc_bench"
  # shellcheck disable=SC2046
  cc -O2 -Wall -o "$DPDK_BIN" "$ROOT/interop/dpdk_malloc_bench.c" \
    $(pkg-config --cflags --libs libdpdk) -lpthread
else
  log "heap.sh: no cc or libdpdk-dev: DPDK rows skipped"
fi
DPDK_TEST=$(command -v dpdk-test || true)

cd "$ROOT"
BUILD_LOG="$TMP/build.log"
if [ "$BUILD" = 1 ]; then
  log "heap.sh: building the bench binaries (release)"
  cargo bench --no-run -p memplane-heap -p memplane >"$BUILD_LOG" 2>&1 ||
    { cat "$BUILD_LOG" >&2; die "build failed"; }
else
  cargo bench --no-run -p memplane-heap -p memplane --offline >"$BUILD_LOG" 2>&1 || true
fi
bin() { # bench name -> its executable, from cargo's "Executable benches/NAME.rs (PATH)" line
  sed -n "s|.*Executable benches/$1\.rs (\(.*\))|\1|p" "$BUILD_LOG" | tail -n 1
}
for b in malloc_perf alloc_pairs global_pairs jemalloc_pairs memzone_lookup page_grow; do
  p=$(bin "$b")
  [ -n "$p" ] && [ -x "$ROOT/$p" ] || die "no executable for bench $b (see $BUILD_LOG)"
done

# ---- waiting for a quiet machine ------------------------------------------------------------
others() { # other benchmark processes that would disturb ours (not ours, not our ancestors)
  ps -eo pid=,args= | awk -v me=$$ '
    $1 != me && ($0 ~ /memplane-ipc-bench/ || $0 ~ /bench[/]ipc[.]sh/ || $0 ~ /dpdk-test/ || $0 ~ /dpdk_bench/ ||
                 $0 ~ /unix_pingpong/ || $0 ~ /[/]deps[/](malloc_perf|alloc_pairs|global_pairs|jemalloc_pairs|memzone_lookup|page_grow)-/) &&
    $0 !~ /awk/ { print }' | grep -v -E "^ *($(IFS='|'; echo "${PIDS[*]:-0}"))( |$)" || true
}
busy_pct() { # CPU busy over half a second, in percent
  local a b
  read -r _ u1 n1 s1 i1 w1 q1 sq1 st1 _ < /proc/stat
  sleep 0.5
  read -r _ u2 n2 s2 i2 w2 q2 sq2 st2 _ < /proc/stat
  a=$(( (u2+n2+s2+q2+sq2+st2) - (u1+n1+s1+q1+sq1+st1) ))
  b=$(( a + (i2+w2) - (i1+w1) ))
  echo $(( b > 0 ? 100 * a / b : 0 ))
}
wait_quiet() {
  [ "$WAIT_IDLE" = 1 ] || return 0
  local t=0 o b
  while :; do
    o=$(others)
    b=$(busy_pct)
    if [ -z "$o" ] && [ "$b" -lt 15 ]; then return 0; fi
    if [ $((t % 30)) = 0 ]; then
      log "heap.sh: waiting for a quiet machine (busy ${b}%); other benchmarks:"
      [ -n "$o" ] && printf '%s\n' "$o" | cut -c1-150 >&2
    fi
    t=$((t + 1))
    if [ "$t" -gt 1800 ]; then die "the machine did not go quiet in 30 minutes"; fi
    sleep 0.5
  done
}

# ---- run ------------------------------------------------------------------------------------
RESULTS="$TMP/results.txt"
: >"$RESULTS"
run() { # [placement] name args... : runs a bench binary, its stdout to the results and the terminal
  local pl=float explicit=0
  case "$1" in float|cpu0) pl=$1; explicit=1; shift ;; esac
  local name=$1; shift
  local pre=() lcores="0-1"
  if [ "$pl" = cpu0 ]; then pre=(taskset -c 0); lcores=0; fi
  # Floating DPDK as memplane floats: with -l 0-1 EAL pins each main thread to CPU 0 and gives
  # the control threads (rte_mp_handle) CPU 0 too, so a "float" DPDK would run on one CPU. The
  # pairs need two pinned lcores (0 and 1), so only the benchmarks with placements float.
  if [ "$pl" = float ] && [ "$explicit" = 1 ]; then lcores="--lcores=0@(0-1)"; fi
  wait_quiet
  log "heap.sh: [$pl] $name $*"
  MPB_DPDK_LCORES=$lcores "${pre[@]}" "$ROOT/$(bin "$name")" "$@" --placement "$pl" \
    > >(tee -a "$RESULTS") &
  PIDS+=($!)
  wait "$!"
}

MACHINE="$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), \
$(uname -r), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), \
hugepages $(awk '/HugePages_Total/ {t=$2} /HugePages_Free/ {f=$2} END {print t " x 2 MiB (" f " free)"}' /proc/meminfo)"
{
  echo "# bench/heap.sh run: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "# command: $CMDLINE"
  echo "# commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || cat "$ROOT/.measured-commit" 2>/dev/null || echo unknown)"
  echo "# machine: $MACHINE"
  echo "# DPDK: ${DPDK_VERSION:-none} (dpdk-test: ${DPDK_TEST:-none})"
} | tee -a "$RESULTS"

DPDK_ARGS=()
[ -n "$DPDK_BIN" ] && DPDK_ARGS=(--dpdk-bin "$DPDK_BIN")
for b in $ONLY; do
  case "$b" in
    malloc_perf)
      if [ -n "$DPDK_TEST" ]; then
        run malloc_perf --reps "$REPS" --dpdk-test "$DPDK_TEST"
      else
        run malloc_perf --reps "$REPS" --no-dpdk
      fi ;;
    malloc_perf_prealloc)
      [ -n "$DPDK_TEST" ] || die "malloc_perf_prealloc needs dpdk-test"
      run malloc_perf --reps "$REPS" --modes huge --socket-mem 2048 --dpdk-test "$DPDK_TEST" ;;
    alloc_pairs)
      # Many short repetitions of the fast rows (31 by default: this VM's speed changes by up to
      # 2x for a second or so at a time, and a median of many short 1-/2-thread pairs is not
      # moved by it), R of the slow ones (the heap directly, DPDK).
      if [ "$QUICK" = 1 ]; then Q=(--reps 3 --count 500000 --slow-count 100000); else Q=(); fi
      run alloc_pairs --slow-reps "$REPS" --global-bin "$ROOT/$(bin global_pairs)" \
        --jemalloc-bin "$ROOT/$(bin jemalloc_pairs)" "${DPDK_ARGS[@]}" "${Q[@]}" ;;
    memzone_lookup)
      if [ "$QUICK" = 1 ]; then Q=(--count 100000 --dpdk-count 1000); else Q=(); fi
      for pl in $PLACEMENTS; do
        run "$pl" memzone_lookup --reps "$REPS" "${DPDK_ARGS[@]}" "${Q[@]}"
      done ;;
    page_grow)
      if [ "$QUICK" = 1 ]; then Q=(--count 40 --warmup 5); else Q=(); fi
      for pl in $PLACEMENTS; do
        # Floating, the primary's rounds also run beside a thread spinning on the other CPU.
        B=(); [ "$pl" = float ] && B=(--busy)
        run "$pl" page_grow --reps "$REPS" "${DPDK_ARGS[@]}" "${Q[@]}" "${B[@]}"
      done ;;
    *) die "unknown benchmark $b" ;;
  esac
done

# ---- the tables -----------------------------------------------------------------------------
REPORT="$TMP/report.md"
{
  grep '^# ' "$RESULTS" | grep -E '^# (bench/heap.sh|command|commit|machine|DPDK)'
  echo
  # Every table and target line the benches printed, in order.
  awk '/^## / {on=1} on && (/^(##|###|\|)/ || /^target/ || /^floor/ || /^$/) {print}' "$RESULTS"
} >"$REPORT"
echo
echo "================================ heap.sh summary ================================"
cat "$REPORT"
if [ -n "$OUT" ]; then cp "$REPORT" "$OUT"; log "heap.sh: tables written to $OUT"; fi
