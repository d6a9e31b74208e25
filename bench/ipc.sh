#!/usr/bin/env bash
# bench/ipc.sh: memplane's IPC benchmark against DPDK 22.11, in one run, like with like.
#
# Builds `memplane` (release), the DPDK 22.11 C peer interop/dpdk_bench.c and the bare AF_UNIX
# ping-pong interop/unix_pingpong.c, then for each placement runs, interleaved so that drift
# hits every implementation alike:
#   - round trip, secondary to primary (sync request; bare: a datagram ping-pong);
#   - broadcast from the primary to 1, 2, 4, 8 secondaries (sync request to all; bare: a
#     datagram to each of K echoing processes, then their K answers);
#   - async requests per second from a secondary, W in flight (W distinct names);
#   - one-way messages per second from a secondary, counted by the primary.
# memplane runs twice: with its defaults, and with --batch-sched (its channel threads under
# SCHED_BATCH, so a datagram does not preempt the running thread: bursts on a shared CPU), shown
# as memplane-batch.
# and prints every result line plus a markdown table with the ratios memplane/DPDK and
# memplane/bare and the issue's targets.
#
# Placements: cpu0  = every process under `taskset -c 0`, DPDK with `-l 0` (so EAL pins its main
#                     and control threads, rte_mp_handle included, to CPU 0 as well);
#             float = no pinning; DPDK with `--lcores 0@(0-N)` (with `-l 0-1` EAL would pin its
#                     main and control threads to CPU 0 even here, so DPDK would not float).
# memplane speaks the 22.11 wire ABI (332-byte datagrams, as DPDK 22.11 and the bare ping-pong).
# DPDK secondaries cannot attach to a --no-huge primary, so the DPDK processes use hugepages
# (-m 64 = 32 pages of 2 MB); the script reserves and mounts them if needed and undoes it.
#
# Usage: bench/ipc.sh [--quick] [--repeat R] [--placements "cpu0 float"] [--out FILE] [--no-build]
#                     [--no-wait-idle]
#   --quick        a tenth of the samples (a smoke run)
#   --repeat R     run everything R times; the table shows the median of the R results
#   --placements   which placements (default "cpu0 float")
#   --out FILE     also write the report (markdown) to FILE
#   --no-build     use target/release/memplane as it is (the C programs are always built)
#   --no-wait-idle do not wait, before each measurement, until other processes leave the CPUs
#                  idle (by default it waits up to 2 minutes for < 10% busy over half a second)
#   --rtt-chunks K measure each round trip in K interleaved chunks (default 10; see below)
# The round trips are measured in K chunks of a K-th of the samples each, the implementations
# taking turns chunk by chunk: this VM's speed shifts by a third for seconds at a time, and a
# shift must hit every implementation alike. The table's round-trip rows are the median of
# the chunks' medians (p99, minimum: of the chunks' p99s, minimums) over every repeat.
# Needs root (DPDK's runtime dir /var/run/dpdk), cc, pkg-config and libdpdk-dev 22.11, cargo.
# Every process it starts is stopped, and every runtime dir, hugepage file and temp dir it
# makes is removed, also on failure or Ctrl-C.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CMDLINE="bench/ipc.sh $*"
QUICK=0
REPEAT=1
PLACEMENTS="cpu0 float"
OUT=""
BUILD=1
WAIT_IDLE=1
RTT_CHUNKS=10
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --repeat) REPEAT=$2; shift ;;
    --placements) PLACEMENTS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --no-build) BUILD=0 ;;
    --no-wait-idle) WAIT_IDLE=0 ;;
    --rtt-chunks) RTT_CHUNKS=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "ipc.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

RTT_N=10000 RTT_WARM=1000
BC_N=2000 BC_WARM=200
ASYNC_N=100000 ASYNC_WARM=10000
ONEWAY_N=200000
if [ "$QUICK" = 1 ]; then
  RTT_N=1000 RTT_WARM=100 BC_N=200 BC_WARM=20 ASYNC_N=10000 ASYNC_WARM=1000 ONEWAY_N=20000
fi
case "$RTT_CHUNKS" in
  ''|*[!0-9]*) echo "ipc.sh: --rtt-chunks needs a number" >&2; exit 2 ;;
esac
if [ "$RTT_CHUNKS" -lt 1 ] || [ "$RTT_CHUNKS" -gt "$RTT_N" ]; then
  echo "ipc.sh: --rtt-chunks must be between 1 and $RTT_N" >&2
  exit 2
fi
WINDOWS="8 16"      # async requests in flight; the kernel queues 10 datagrams per socket here
MAXW=16
SECONDARIES="1 2 4 8"
NCPU=$(nproc --all)
STEP_TIMEOUT=300    # seconds any one benchmark process may take

log() { printf '%s\n' "$*" >&2; }
die() { log "ipc.sh: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (DPDK's runtime directory is /var/run/dpdk)"
command -v cc >/dev/null || die "no C compiler (cc)"
pkg-config --exists libdpdk || die "DPDK (libdpdk-dev) not found by pkg-config"
DPDK_VERSION=$(pkg-config --modversion libdpdk)
case "$DPDK_VERSION" in 22.11*) ;; *) die "DPDK 22.11 wanted, pkg-config finds $DPDK_VERSION" ;; esac

# ---- cleanup: every process, runtime dir, hugepage file and temp dir we make ------------------

WORK=$(mktemp -d /tmp/memplane-ipc-bench.XXXXXX)
TAG="ipcb$$"                      # every DPDK --file-prefix starts with this
PIDS=()                           # background processes still running
OLD_NR_HUGEPAGES=""
MOUNTED_HUGEPAGES=0

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf /var/run/dpdk/"$TAG"-* 2>/dev/null || true
  rm -f /dev/hugepages/"$TAG"-* 2>/dev/null || true
  if [ "$MOUNTED_HUGEPAGES" = 1 ]; then umount /dev/hugepages 2>/dev/null || true; fi
  if [ -n "$OLD_NR_HUGEPAGES" ]; then echo "$OLD_NR_HUGEPAGES" >/proc/sys/vm/nr_hugepages || true; fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- hugepages for the DPDK processes ---------------------------------------------------------

free_pages=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)
if [ "${free_pages:-0}" -lt 64 ]; then
  OLD_NR_HUGEPAGES=$(cat /proc/sys/vm/nr_hugepages)
  echo $((OLD_NR_HUGEPAGES + 256)) >/proc/sys/vm/nr_hugepages
  log "reserved 256 more hugepages (nr_hugepages was $OLD_NR_HUGEPAGES)"
fi
if ! grep -q ' /dev/hugepages hugetlbfs ' /proc/mounts; then
  mkdir -p /dev/hugepages
  mount -t hugetlbfs nodev /dev/hugepages
  MOUNTED_HUGEPAGES=1
fi

# ---- build ------------------------------------------------------------------------------------

BIN="$WORK/bin"
mkdir -p "$BIN"
if [ "$BUILD" = 1 ]; then
  log "building (release) ..."
  (cd "$ROOT" && cargo build --release --quiet --bin memplane) || die "cargo build failed"
fi
[ -x "$ROOT/target/release/memplane" ] || die "no target/release/memplane"
# A private copy: a rebuild in the workspace during the run does not change what we measure.
cp "$ROOT/target/release/memplane" "$BIN/memplane"
# shellcheck disable=SC2046
cc -O2 -Wall -o "$BIN/dpdk_bench" "$ROOT/interop/dpdk_bench.c" $(pkg-config --cflags --libs libdpdk)
cc -O2 -Wall -o "$BIN/unix_pingpong" "$ROOT/interop/unix_pingpong.c"
MEMPLANE_REV=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(cd "$ROOT" && git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  MEMPLANE_REV="$MEMPLANE_REV+uncommitted changes"
fi

# ---- process helpers --------------------------------------------------------------------------

RESULTS="$WORK/results.txt"
FAILURES="$WORK/failures.txt"
: >"$RESULTS"
: >"$FAILURES"
SEQ=0

# start_bg LOG CMD...: starts CMD in the background; its pid is in $BG_PID.
start_bg() {
  local logf=$1; shift
  "$@" >"$logf" 2>&1 &
  BG_PID=$!
  PIDS+=("$BG_PID")
}

# stop PID...: SIGTERM, wait (SIGKILL after 5 s), forget.
stop() {
  local pid keep=() p
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  for p in "${PIDS[@]}"; do
    local gone=0
    for pid in "$@"; do [ "$p" = "$pid" ] && gone=1; done
    [ "$gone" = 0 ] && keep+=("$p")
  done
  PIDS=("${keep[@]+"${keep[@]}"}")
}

# wait_ready PID LOG: until LOG has a `ready` line (30 s); fails if the process died.
wait_ready() {
  local pid=$1 logf=$2
  for _ in $(seq 600); do
    grep -q '^ready' "$logf" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { log "process $pid died:"; tail -n 20 "$logf" >&2; return 1; }
    sleep 0.05
  done
  log "process $pid not ready after 30 s:"; tail -n 20 "$logf" >&2
  return 1
}

# Percent of all CPUs busy over half a second (from /proc/stat).
cpu_busy_pct() {
  local a b
  read -r -a a < <(head -n1 /proc/stat)
  sleep 0.5
  read -r -a b < <(head -n1 /proc/stat)
  local total=0 idle i
  for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
  idle=$((b[4] - a[4] + b[5] - a[5]))
  [ "$total" -gt 0 ] || { echo 0; return; }
  echo $((100 * (total - idle) / total))
}

# Waits (at most 2 minutes) until nothing else keeps the CPUs busy.
BUSY_WAITS=0 BUSY_GAVE_UP=0
wait_idle() {
  [ "$WAIT_IDLE" = 1 ] || return 0
  local n=0
  while [ "$(cpu_busy_pct)" -gt 10 ]; do
    n=$((n + 1))
    if [ "$n" -ge 240 ]; then
      log "machine still busy after 2 minutes; measuring anyway"
      BUSY_GAVE_UP=$((BUSY_GAVE_UP + 1))
      return 0
    fi
  done
  [ "$n" -gt 0 ] && BUSY_WAITS=$((BUSY_WAITS + 1))
  return 0
}

# record WHAT LOG: appends LOG's result lines, or a failure note.
record() {
  local what=$1 logf=$2
  if grep -q '^bench=' "$logf"; then
    # memplane run with --batch-sched is reported as its own implementation, memplane-batch
    case "$what" in
      memplane-batch*) grep '^bench=' "$logf" | sed 's/ impl=memplane / impl=memplane-batch /' ;;
      *) grep '^bench=' "$logf" ;;
    esac | tee -a "$RESULTS" >&2
    # memplane's channel counters (outbox use), kept as comments under the results
    grep '^stats ' "$logf" | sed "s|^|# $what: |" >>"$RESULTS" || true
  else
    echo "FAILED: $what" | tee -a "$FAILURES" >&2
    tail -n 8 "$logf" | sed 's/^/    /' >&2
  fi
}

# run_fg WHAT CMD...: runs CMD in the foreground (with a timeout), records its result lines.
run_fg() {
  local what=$1; shift
  SEQ=$((SEQ + 1))
  local logf="$WORK/run-$SEQ.log"
  wait_idle
  # In the background and waited for, so that a signal to this script is handled at once.
  timeout "$STEP_TIMEOUT" "$@" >"$logf" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  wait "$pid" || true
  stop "$pid"
  record "$what" "$logf"
}

# ---- the deployments --------------------------------------------------------------------------

# Placement-specific command prefix and DPDK core options.
set_placement() {
  case "$1" in
    cpu0) PIN=(taskset -c 0); EAL_CORES=(-l 0) ;;
    float) PIN=(); EAL_CORES=(--lcores "0@(0-$((NCPU - 1)))") ;;
    *) die "unknown placement $1" ;;
  esac
}

dpdk_eal() { # PREFIX [secondary]
  local a=(-m 64 --no-pci "${EAL_CORES[@]}" --file-prefix="$1")
  [ "${2:-}" = secondary ] && a+=(--proc-type=secondary)
  printf '%s\n' "${a[@]}" --
}

# One deployment per implementation for the point-to-point benchmarks.
p2p() { # PLACEMENT
  local pl=$1 prefix rt pid w c

  prefix="$TAG-p2p-$SEQ"
  local SEQ0=$SEQ
  mapfile -t PRIM < <(dpdk_eal "$prefix")
  mapfile -t SEC < <(dpdk_eal "$prefix" secondary)
  start_bg "$WORK/dpdk-serve-$SEQ0.log" "${PIN[@]}" "$BIN/dpdk_bench" "${PRIM[@]}" serve --window "$MAXW"
  pid=$BG_PID
  rt="$WORK/rt-$SEQ0"
  start_bg "$WORK/mp-serve-$SEQ0.log" "${PIN[@]}" "$BIN/memplane" mp bench serve --abi 22.11 \
    --runtime-dir "$rt" --proc-type primary --window "$MAXW"
  local mpid=$BG_PID
  local rtb="$WORK/rtb-$SEQ0"
  start_bg "$WORK/mpb-serve-$SEQ0.log" "${PIN[@]}" "$BIN/memplane" mp bench serve --abi 22.11 \
    --runtime-dir "$rtb" --proc-type primary --window "$MAXW" --batch-sched
  local bpid=$BG_PID
  if wait_ready "$pid" "$WORK/dpdk-serve-$SEQ0.log" && wait_ready "$mpid" "$WORK/mp-serve-$SEQ0.log" \
    && wait_ready "$bpid" "$WORK/mpb-serve-$SEQ0.log"; then
    local MP=(--abi 22.11 --runtime-dir "$rt" --proc-type secondary)
    local MPB=(--abi 22.11 --runtime-dir "$rtb" --proc-type secondary --batch-sched)
    local cn=$((RTT_N / RTT_CHUNKS)) cw=$((RTT_WARM / RTT_CHUNKS))
    for c in $(seq "$RTT_CHUNKS"); do
      run_fg "bare rtt $pl ($c/$RTT_CHUNKS)" "${PIN[@]}" "$BIN/unix_pingpong" --count "$cn" --warmup "$cw"
      run_fg "dpdk rtt $pl ($c/$RTT_CHUNKS)" "${PIN[@]}" "$BIN/dpdk_bench" "${SEC[@]}" rtt --count "$cn" --warmup "$cw"
      run_fg "memplane rtt $pl ($c/$RTT_CHUNKS)" "${PIN[@]}" "$BIN/memplane" mp bench rtt "${MP[@]}" --count "$cn" --warmup "$cw"
      run_fg "memplane-batch rtt $pl ($c/$RTT_CHUNKS)" "${PIN[@]}" "$BIN/memplane" mp bench rtt "${MPB[@]}" --count "$cn" --warmup "$cw"
    done
    for w in $WINDOWS; do
      run_fg "dpdk async W=$w $pl" "${PIN[@]}" "$BIN/dpdk_bench" "${SEC[@]}" async --count "$ASYNC_N" --warmup "$ASYNC_WARM" --window "$w"
      run_fg "memplane async W=$w $pl" "${PIN[@]}" "$BIN/memplane" mp bench async "${MP[@]}" --count "$ASYNC_N" --warmup "$ASYNC_WARM" --window "$w"
      run_fg "memplane-batch async W=$w $pl" "${PIN[@]}" "$BIN/memplane" mp bench async "${MPB[@]}" --count "$ASYNC_N" --warmup "$ASYNC_WARM" --window "$w"
    done
    run_fg "dpdk oneway $pl" "${PIN[@]}" "$BIN/dpdk_bench" "${SEC[@]}" oneway --count "$ONEWAY_N"
    run_fg "memplane oneway $pl" "${PIN[@]}" "$BIN/memplane" mp bench oneway "${MP[@]}" --count "$ONEWAY_N"
    run_fg "memplane-batch oneway $pl" "${PIN[@]}" "$BIN/memplane" mp bench oneway "${MPB[@]}" --count "$ONEWAY_N"
  else
    echo "FAILED: primaries did not start ($pl)" >>"$FAILURES"
  fi
  stop "$pid" "$mpid" "$bpid"
  grep '^stats ' "$WORK/mp-serve-$SEQ0.log" 2>/dev/null | sed "s|^|# memplane primary $pl: |" >>"$RESULTS" || true
  rm -rf "/var/run/dpdk/$prefix" "$rt" "$rtb"
  rm -f /dev/hugepages/"$prefix"map_*
}

# A primary broadcasting to K secondaries of the same implementation.
broadcast() { # PLACEMENT IMPL K
  local pl=$1 impl=$2 k=$3 prefix rt go prim i ok=1
  SEQ=$((SEQ + 1))
  go="$WORK/go-$SEQ"
  local plog="$WORK/bcast-$SEQ.log" secs=()
  prefix="$TAG-bc-$SEQ"
  rt="$WORK/rt-$SEQ"
  if [ "$impl" = dpdk ]; then
    mapfile -t PRIM < <(dpdk_eal "$prefix")
    mapfile -t SEC < <(dpdk_eal "$prefix" secondary)
    start_bg "$plog" "${PIN[@]}" "$BIN/dpdk_bench" "${PRIM[@]}" broadcast --peers "$k" \
      --count "$BC_N" --warmup "$BC_WARM" --go-file "$go"
  else
    local extra=()
    [ "$impl" = memplane-batch ] && extra=(--batch-sched)
    start_bg "$plog" "${PIN[@]}" "$BIN/memplane" mp bench broadcast --abi 22.11 --runtime-dir "$rt" \
      --proc-type primary --peers "$k" --count "$BC_N" --warmup "$BC_WARM" --go-file "$go" \
      "${extra[@]+"${extra[@]}"}"
  fi
  prim=$BG_PID
  wait_ready "$prim" "$plog" || ok=0
  for i in $(seq "$k"); do
    [ "$ok" = 1 ] || break
    local slog="$WORK/bcast-$SEQ-sec$i.log"
    if [ "$impl" = dpdk ]; then
      start_bg "$slog" "${PIN[@]}" "$BIN/dpdk_bench" "${SEC[@]}" serve --window 1
    else
      start_bg "$slog" "${PIN[@]}" "$BIN/memplane" mp bench serve --abi 22.11 --runtime-dir "$rt" \
        --proc-type secondary --window 1 "${extra[@]+"${extra[@]}"}"
    fi
    secs+=("$BG_PID")
    wait_ready "$BG_PID" "$slog" || ok=0
  done
  if [ "$ok" = 1 ]; then
    wait_idle
    touch "$go"
    for _ in $(seq $((STEP_TIMEOUT * 10))); do kill -0 "$prim" 2>/dev/null || break; sleep 0.1; done
  fi
  stop "$prim" "${secs[@]+"${secs[@]}"}"
  record "$impl broadcast K=$k $pl" "$plog"
  rm -rf "/var/run/dpdk/$prefix" "$rt"
  rm -f /dev/hugepages/"$prefix"map_*
}

# ---- run --------------------------------------------------------------------------------------

STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "memplane $MEMPLANE_REV, DPDK $DPDK_VERSION, placements: $PLACEMENTS, repeat $REPEAT, load $LOAD_BEFORE"
for r in $(seq "$REPEAT"); do
  for pl in $PLACEMENTS; do
    set_placement "$pl"
    log "== run $r/$REPEAT, placement $pl: round trip, async, one-way"
    p2p "$pl"
    for k in $SECONDARIES; do
      log "== run $r/$REPEAT, placement $pl: broadcast to $k"
      run_fg "bare broadcast K=$k $pl" "${PIN[@]}" "$BIN/unix_pingpong" --peers "$k" \
        --count "$BC_N" --warmup "$BC_WARM"
      broadcast "$pl" dpdk "$k"
      broadcast "$pl" memplane "$k"
      broadcast "$pl" memplane-batch "$k"
    done
  done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- report -----------------------------------------------------------------------------------

table() {
  awk -v placements="$PLACEMENTS" -v windows="$WINDOWS" -v ks="$SECONDARIES" '
    /^bench=/ {
      split("", f)
      for (i = 1; i <= NF; i++) { p = index($i, "="); f[substr($i, 1, p - 1)] = substr($i, p + 1) }
      id = f["placement"] "|" f["bench"] "|" f["impl"] "|" f["secondaries"] f["window"]
      for (m = 1; m <= 4; m++) {
        metric = (m == 1 ? "p50_us" : m == 2 ? "p99_us" : m == 3 ? "min_us" : "per_s")
        if (metric in f) { n = ++cnt[id, metric]; val[id, metric, n] = f[metric] + 0 }
      }
    }
    function med(id, metric,   n, i, j, t, a) {
      n = cnt[id, metric]
      if (n == 0) return ""
      for (i = 1; i <= n; i++) a[i] = val[id, metric, i]
      for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function num(x, rate) {
      if (x == "") return "–"
      return rate ? sprintf("%.0fk", x / 1000) : sprintf("%.1f", x)
    }
    function ratio(a, b) { return (a == "" || b == "" || b == 0) ? "–" : sprintf("%.2f×", a / b) }
    function row(pl, label, bench, extra, metric, kind,   b, d, m, mb, rate, target) {
      rate = (metric == "per_s")
      b = med(pl "|" bench "|bare|" extra, metric)
      d = med(pl "|" bench "|dpdk|" extra, metric)
      m = med(pl "|" bench "|memplane|" extra, metric)
      mb = med(pl "|" bench "|memplane-batch|" extra, metric)
      target = ""
      if (kind == "rtt") target = "≤ 0.6× DPDK, ≤ 1.3× bare"
      else if (kind == "bcast") target = "≤ 0.25× DPDK"
      else if (kind == "rate") target = "≥ 2× DPDK"
      printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", label, num(b, rate), num(d, rate), num(m, rate), ratio(m, d), ratio(m, b), num(mb, rate), ratio(mb, d), target, verdict(kind, m, d, b), verdict(kind, mb, d, b)
    }
    function verdict(kind, m, d, b) {
      if (kind == "rtt") return (m == "" || d == "" || b == "") ? "" : (m <= 0.6 * d && m <= 1.3 * b) ? "yes" : "no"
      if (kind == "bcast") return (m == "" || d == "") ? "" : (m <= 0.25 * d) ? "yes" : "no"
      if (kind == "rate") return (m == "" || d == "") ? "" : (m >= 2 * d) ? "yes" : "no"
      return ""
    }
    END {
      np = split(placements, pls, " "); nw = split(windows, ws, " "); nk = split(ks, kk, " ")
      for (p = 1; p <= np; p++) {
        pl = pls[p]
        printf "\n### placement: %s\n\n", pl
        print "| benchmark | bare AF_UNIX | DPDK 22.11 | memplane | memplane/DPDK | memplane/bare | memplane --batch-sched | batch/DPDK | target | met | met (batch) |"
        print "|---|---|---|---|---|---|---|---|---|---|---|"
        row(pl, "round trip, median (µs)", "rtt", "", "p50_us", "rtt")
        row(pl, "round trip, p99 (µs)", "rtt", "", "p99_us", "")
        row(pl, "round trip, minimum (µs)", "rtt", "", "min_us", "")
        for (i = 1; i <= nk; i++)
          row(pl, "broadcast to " kk[i] ", median (µs)", "broadcast", kk[i], "p50_us", kk[i] == 8 ? "bcast" : "")
        for (i = 1; i <= nk; i++)
          row(pl, "broadcast to " kk[i] ", p99 (µs)", "broadcast", kk[i], "p99_us", "")
        for (i = 1; i <= nw; i++)
          row(pl, "async, " ws[i] " in flight (requests/s)", "async", ws[i], "per_s", "rate")
        row(pl, "one-way (messages/s, at the receiver)", "oneway", "", "per_s", "rate")
      }
    }' "$RESULTS"
}

{
  echo "## IPC benchmark: memplane vs DPDK $DPDK_VERSION"
  echo
  echo "- command: \`$CMDLINE\` (repeat $REPEAT; the table shows medians over the repeats)"
  echo "- date: $STARTED; memplane $MEMPLANE_REV; DPDK $DPDK_VERSION; memplane on the 22.11 wire ABI"
  echo "- machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $NCPU CPUs, Linux $(uname -r); load average before $LOAD_BEFORE, after $LOAD_AFTER"
  if [ "$WAIT_IDLE" = 1 ]; then
    echo "- idle wait: before each measurement the script waited for the CPUs to be < 10% busy (it had to wait $BUSY_WAITS times, gave up after 2 minutes $BUSY_GAVE_UP times)"
  else
    echo "- idle wait: off (--no-wait-idle)"
  fi
  echo "- samples: round trip $RTT_N (+$RTT_WARM warm-up) in $RTT_CHUNKS interleaved chunks, broadcast $BC_N (+$BC_WARM), async $ASYNC_N (+$ASYNC_WARM), one-way $ONEWAY_N"
  echo "- placements: cpu0 = all processes \`taskset -c 0\` (DPDK \`-l 0\`); float = unpinned (DPDK \`--lcores 0@(0-$((NCPU - 1)))\`)"
  table
  echo
  if [ -s "$FAILURES" ]; then
    echo "Failures:"
    echo
    sed 's/^/    /' "$FAILURES"
    echo
  fi
  echo "Result lines:"
  echo
  echo '```'
  cat "$RESULTS"
  echo '```'
} >"$WORK/report.md"

cat "$WORK/report.md"
if [ -n "$OUT" ]; then cp "$WORK/report.md" "$OUT"; fi
[ ! -s "$FAILURES" ]
