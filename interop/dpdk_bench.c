/*
 * dpdk_bench: the DPDK 22.11 side of memplane's IPC benchmark (bench/ipc.sh), measuring DPDK's
 * own multi-process channel (public rte_mp_* API only) the same way `memplane mp bench` measures
 * memplane's, with the same action names and the same output lines.
 *
 * Usage (EAL arguments first, then `--`, then the mode and its options):
 *
 *   dpdk_bench EAL-ARGS -- serve [--window W]
 *       Primary or secondary. Registers the benchmark actions and prints `ready role=...`, then
 *       runs until SIGTERM or SIGINT:
 *         bench_ping, bench_bcast, bench_0 .. bench_{W-1}: reply with the request's name and
 *             param (default W = 16);
 *         bench_oneway: one-way message, counted;
 *         bench_oneway_start: request: resets the count and the clock, replies;
 *         bench_oneway_end: request: replies with the count and the nanoseconds from the start
 *             to the last counted message (two little-endian u64).
 *
 *   dpdk_bench EAL-ARGS -- rtt [--count N] [--warmup M]
 *       Secondary: M unmeasured, then N measured rte_mp_request_sync round trips of bench_ping
 *       to the primary.
 *
 *   dpdk_bench EAL-ARGS -- broadcast --peers K [--count N] [--warmup M] [--go-file PATH]
 *       Primary: waits (at most 600 s) for K secondary sockets and for PATH to exist, then M
 *       unmeasured and N measured rte_mp_request_sync broadcasts of bench_bcast to every
 *       secondary.
 *
 *   dpdk_bench EAL-ARGS -- async [--count N] [--window W] [--warmup M]
 *       Secondary: N rte_mp_request_async requests to the primary, W in flight at once (one per
 *       name bench_0 .. bench_{W-1}, since one name may have only one pending request per peer);
 *       each completion callback starts the next request of its name.
 *
 *   dpdk_bench EAL-ARGS -- oneway [--count N]
 *       Secondary: bench_oneway_start, then N rte_mp_sendmsg of bench_oneway as fast as they go,
 *       then bench_oneway_end until the primary counted all N (or stops counting for 2 s). The
 *       rate is the primary's count over the primary's time.
 *
 *   Every mode also takes --placement NAME (default: from the CPU affinity at start: `cpuN` for
 *   one CPU, `float` for every online CPU). Results are single lines starting `bench=`:
 *       bench=rtt impl=dpdk placement=P n=N min_us= p50_us= p90_us= p99_us= max_us=
 *       bench=broadcast impl=dpdk placement=P secondaries=K n=N ... incomplete=I
 *       bench=async impl=dpdk placement=P n=N window=W secs=S per_s=R failed=F
 *       bench=oneway impl=dpdk placement=P n=N received=C secs=S per_s=R send_per_s=R2
 *
 * Build: cc -O2 -o dpdk_bench interop/dpdk_bench.c $(pkg-config --cflags --libs libdpdk)
 *
 * Our own code, written against the public rte_eal.h API of DPDK 22.11.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <glob.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <rte_eal.h>
#include <rte_errno.h>

#define PING "bench_ping"
#define BCAST "bench_bcast"
#define ONEWAY "bench_oneway"
#define ONEWAY_START "bench_oneway_start"
#define ONEWAY_END "bench_oneway_end"
#define MAX_WINDOW 1024
#define TIMEOUT_S 5

static char placement[64];

static void die(const char *what)
{
	fprintf(stderr, "dpdk_bench: %s\n", what);
	exit(2);
}

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* The placement label from this thread's CPU affinity (call before rte_eal_init pins it). */
static void detect_placement(void)
{
	cpu_set_t set;
	long online = sysconf(_SC_NPROCESSORS_ONLN);
	int n, len = 0;

	CPU_ZERO(&set);
	if (sched_getaffinity(0, sizeof(set), &set) != 0) {
		snprintf(placement, sizeof(placement), "unknown");
		return;
	}
	n = CPU_COUNT(&set);
	if (n == online && n > 1) {
		snprintf(placement, sizeof(placement), "float");
		return;
	}
	len = snprintf(placement, sizeof(placement), n == 1 ? "cpu" : "cpus");
	for (int c = 0, first = 1; c < CPU_SETSIZE && len < (int)sizeof(placement) - 8; c++) {
		if (!CPU_ISSET(c, &set))
			continue;
		len += snprintf(placement + len, sizeof(placement) - (size_t)len, "%s%d",
				first ? "" : ",", c);
		first = 0;
	}
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* Percentile p of sorted samples: the sample at rank round((n - 1) * p). */
static double pct_us(const uint64_t *s, int n, double p)
{
	int i = (int)((double)(n - 1) * p + 0.5);

	if (n == 0)
		return 0;
	if (i > n - 1)
		i = n - 1;
	return (double)s[i] / 1000.0;
}

static void print_latency(const char *bench, const char *extra, uint64_t *s, int n,
			  const char *tail)
{
	qsort(s, (size_t)n, sizeof(*s), cmp_u64);
	printf("bench=%s impl=dpdk placement=%s%s n=%d min_us=%.1f p50_us=%.1f p90_us=%.1f "
	       "p99_us=%.1f max_us=%.1f%s\n",
	       bench, placement, extra, n, pct_us(s, n, 0), pct_us(s, n, 0.5), pct_us(s, n, 0.9),
	       pct_us(s, n, 0.99), pct_us(s, n, 1), tail);
	fflush(stdout);
}

static void set_msg(struct rte_mp_msg *m, const char *name, const void *param, int len)
{
	memset(m, 0, sizeof(*m));
	snprintf(m->name, sizeof(m->name), "%s", name);
	m->len_param = len;
	if (len > 0)
		memcpy(m->param, param, (size_t)len);
}

static const struct timespec req_timeout = { TIMEOUT_S, 0 };

/* ---- serve ---------------------------------------------------------------------------- */

static atomic_uint_fast64_t oneway_count;
static _Atomic uint64_t oneway_t0, oneway_last;

static int echo_action(const struct rte_mp_msg *msg, const void *peer)
{
	struct rte_mp_msg reply;

	set_msg(&reply, msg->name, msg->param, msg->len_param);
	return rte_mp_reply(&reply, (const char *)peer);
}

static int oneway_action(const struct rte_mp_msg *msg, const void *peer)
{
	(void)msg;
	(void)peer;
	atomic_store_explicit(&oneway_last, now_ns(), memory_order_relaxed);
	atomic_fetch_add_explicit(&oneway_count, 1, memory_order_relaxed);
	return 0;
}

static int oneway_start_action(const struct rte_mp_msg *msg, const void *peer)
{
	uint64_t t = now_ns();

	atomic_store(&oneway_count, 0);
	atomic_store(&oneway_t0, t);
	atomic_store(&oneway_last, t);
	return echo_action(msg, peer);
}

static int oneway_end_action(const struct rte_mp_msg *msg, const void *peer)
{
	struct rte_mp_msg reply;
	uint64_t v[2];

	v[0] = atomic_load(&oneway_count);
	v[1] = atomic_load(&oneway_last) - atomic_load(&oneway_t0);
	set_msg(&reply, msg->name, v, (int)sizeof(v));
	return rte_mp_reply(&reply, (const char *)peer);
}

static void window_name(char *buf, size_t len, int i)
{
	snprintf(buf, len, "bench_%d", i);
}

static void must_register(const char *name, rte_mp_t action)
{
	if (rte_mp_action_register(name, action) < 0) {
		fprintf(stderr, "dpdk_bench: rte_mp_action_register(%s): %s\n", name,
			strerror(rte_errno));
		exit(2);
	}
}

static int serve(const sigset_t *stop, int window)
{
	char name[RTE_MP_MAX_NAME_LEN];
	int sig;

	must_register(PING, echo_action);
	must_register(BCAST, echo_action);
	for (int i = 0; i < window; i++) {
		window_name(name, sizeof(name), i);
		must_register(name, echo_action);
	}
	must_register(ONEWAY, oneway_action);
	must_register(ONEWAY_START, oneway_start_action);
	must_register(ONEWAY_END, oneway_end_action);
	printf("ready role=%s dir=%s pid=%d\n",
	       rte_eal_process_type() == RTE_PROC_PRIMARY ? "primary" : "secondary",
	       rte_eal_get_runtime_dir(), (int)getpid());
	fflush(stdout);
	while (sigwait(stop, &sig) != 0)
		;
	return 0;
}

/* ---- rtt ------------------------------------------------------------------------------ */

/* One sync request of `name` to every peer; returns the replies received, or -1. */
static int request_once(const char *name, const void *param, int len, struct rte_mp_reply *out)
{
	struct rte_mp_msg req;
	struct rte_mp_reply reply;
	int rc, got;

	set_msg(&req, name, param, len);
	memset(&reply, 0, sizeof(reply));
	rc = rte_mp_request_sync(&req, &reply, &req_timeout);
	got = rc == 0 ? reply.nb_received : -1;
	if (out != NULL && got > 0) {
		*out = reply;
		return got;
	}
	free(reply.msgs);
	return got;
}

static int rtt(int count, int warmup)
{
	uint64_t *s = calloc((size_t)count, sizeof(*s));

	if (s == NULL)
		die("out of memory");
	for (int i = 0; i < warmup + count; i++) {
		uint32_t seq = (uint32_t)i;
		uint64_t t0 = now_ns();
		int got = request_once(PING, &seq, sizeof(seq), NULL);
		uint64_t dt = now_ns() - t0;

		if (got != 1) {
			fprintf(stderr, "dpdk_bench: no reply to ping %d (rc/got=%d)\n", i, got);
			return 1;
		}
		if (i >= warmup)
			s[i - warmup] = dt;
	}
	print_latency("rtt", "", s, count, "");
	free(s);
	return 0;
}

/* ---- broadcast ------------------------------------------------------------------------ */

static int count_secondaries(void)
{
	char pattern[PATH_MAX];
	glob_t g;
	int n;

	snprintf(pattern, sizeof(pattern), "%s/mp_socket_*", rte_eal_get_runtime_dir());
	if (glob(pattern, 0, NULL, &g) != 0)
		return 0;
	n = (int)g.gl_pathc;
	globfree(&g);
	return n;
}

static void sleep_ms(long ms)
{
	struct timespec t = { ms / 1000, (ms % 1000) * 1000000L };

	nanosleep(&t, NULL);
}

static int broadcast(int peers, int count, int warmup, const char *go_file)
{
	uint64_t *s = calloc((size_t)count, sizeof(*s));
	uint64_t give_up = now_ns() + 600ull * 1000000000u;
	int incomplete = 0;
	char extra[64], tail[64];

	if (s == NULL)
		die("out of memory");
	if (rte_eal_process_type() != RTE_PROC_PRIMARY)
		die("broadcast must run as the primary");
	printf("ready role=primary dir=%s pid=%d\n", rte_eal_get_runtime_dir(), (int)getpid());
	fflush(stdout);
	while (count_secondaries() < peers || (go_file != NULL && access(go_file, F_OK) != 0)) {
		if (now_ns() > give_up) {
			fprintf(stderr,
				"dpdk_bench: gave up after 600 s waiting for %d secondaries (found %d)"
				" and the go file\n",
				peers, count_secondaries());
			return 1;
		}
		sleep_ms(1);
	}
	for (int i = 0; i < warmup + count; i++) {
		uint32_t seq = (uint32_t)i;
		uint64_t t0 = now_ns();
		int got = request_once(BCAST, &seq, sizeof(seq), NULL);
		uint64_t dt = now_ns() - t0;

		if (i >= warmup) {
			s[i - warmup] = dt;
			if (got != peers)
				incomplete++;
		}
	}
	snprintf(extra, sizeof(extra), " secondaries=%d", peers);
	snprintf(tail, sizeof(tail), " incomplete=%d", incomplete);
	print_latency("broadcast", extra, s, count, tail);
	free(s);
	return incomplete == 0 ? 0 : 1;
}

/* ---- async ---------------------------------------------------------------------------- */

static struct {
	atomic_long issued;
	atomic_long completed;
	atomic_long failed;
	long total;
	sem_t done;
} as;

static int async_cb(const struct rte_mp_msg *req, const struct rte_mp_reply *reply);

/* Starts one async request of `name`; on failure counts it as done and failed. */
static void async_fire(const char *name)
{
	struct rte_mp_msg m;

	set_msg(&m, name, NULL, 0);
	if (rte_mp_request_async(&m, &req_timeout, async_cb) != 0) {
		if (atomic_fetch_add(&as.failed, 1) < 5)
			fprintf(stderr, "dpdk_bench: rte_mp_request_async(%s): %s\n", name,
				strerror(rte_errno));
		if (atomic_fetch_add(&as.completed, 1) + 1 == as.total)
			sem_post(&as.done);
	}
}

static int async_cb(const struct rte_mp_msg *req, const struct rte_mp_reply *reply)
{
	if (reply->nb_received != 1 && atomic_fetch_add(&as.failed, 1) < 5)
		fprintf(stderr, "dpdk_bench: %s: nb_sent=%d nb_received=%d\n", req->name,
			reply->nb_sent, reply->nb_received);
	/* Start the next request before counting this one done: once the count is complete the
	 * main thread may reset the state for the next run. */
	if (atomic_fetch_add(&as.issued, 1) < as.total)
		async_fire(req->name);
	if (atomic_fetch_add(&as.completed, 1) + 1 == as.total)
		sem_post(&as.done);
	return 0;
}

/* Runs `total` async requests with `window` names in flight; returns the seconds taken. */
static double async_run(long total, int window)
{
	char name[RTE_MP_MAX_NAME_LEN];
	uint64_t t0;

	atomic_store(&as.issued, 0);
	atomic_store(&as.completed, 0);
	atomic_store(&as.failed, 0);
	as.total = total;
	t0 = now_ns();
	for (int i = 0; i < window && i < total; i++) {
		atomic_fetch_add(&as.issued, 1);
		window_name(name, sizeof(name), i);
		async_fire(name);
	}
	while (sem_wait(&as.done) != 0)
		;
	return (double)(now_ns() - t0) / 1e9;
}

static int async_bench(long count, int window, long warmup)
{
	double secs;

	if (sem_init(&as.done, 0, 0) != 0)
		die("sem_init failed");
	if (warmup > 0)
		async_run(warmup, window);
	secs = async_run(count, window);
	printf("bench=async impl=dpdk placement=%s n=%ld window=%d secs=%.3f per_s=%.0f failed=%ld\n",
	       placement, count, window, secs, (double)count / secs, atomic_load(&as.failed));
	fflush(stdout);
	return atomic_load(&as.failed) == 0 ? 0 : 1;
}

/* ---- oneway --------------------------------------------------------------------------- */

static int oneway(long count)
{
	struct rte_mp_msg m;
	struct rte_mp_reply reply;
	uint64_t v[2] = { 0, 0 }, t0, sent_ns, last_progress;
	long failed = 0;

	if (request_once(ONEWAY_START, NULL, 0, NULL) != 1)
		die("no reply to bench_oneway_start");
	set_msg(&m, ONEWAY, NULL, 0);
	t0 = now_ns();
	for (long i = 0; i < count; i++) {
		if (rte_mp_sendmsg(&m) != 0)
			failed++;
	}
	sent_ns = now_ns() - t0;
	last_progress = now_ns();
	for (;;) {
		uint64_t before = v[0];

		if (request_once(ONEWAY_END, NULL, 0, &reply) != 1)
			die("no reply to bench_oneway_end");
		if (reply.msgs[0].len_param == (int)sizeof(v))
			memcpy(v, reply.msgs[0].param, sizeof(v));
		free(reply.msgs);
		if (v[0] >= (uint64_t)count)
			break;
		if (v[0] != before)
			last_progress = now_ns();
		else if (now_ns() - last_progress > 2000000000ull)
			break;
		sleep_ms(1);
	}
	printf("bench=oneway impl=dpdk placement=%s n=%ld received=%llu secs=%.3f per_s=%.0f "
	       "send_per_s=%.0f send_failed=%ld\n",
	       placement, count, (unsigned long long)v[0], (double)v[1] / 1e9,
	       v[1] ? (double)v[0] / ((double)v[1] / 1e9) : 0.0, (double)count / (sent_ns / 1e9),
	       failed);
	fflush(stdout);
	return v[0] == (uint64_t)count ? 0 : 1;
}

/* ---- main ----------------------------------------------------------------------------- */

static void usage(void)
{
	fprintf(stderr,
		"usage: dpdk_bench EAL-ARGS -- serve [--window W]\n"
		"       dpdk_bench EAL-ARGS -- rtt [--count N] [--warmup M]\n"
		"       dpdk_bench EAL-ARGS -- broadcast --peers K [--count N] [--warmup M]"
		" [--go-file PATH]\n"
		"       dpdk_bench EAL-ARGS -- async [--count N] [--window W] [--warmup M]\n"
		"       dpdk_bench EAL-ARGS -- oneway [--count N]\n"
		"       (every mode: [--placement NAME])\n");
	exit(2);
}

static long parse_long(const char *s)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || *s == '\0' || *end != '\0' || v < 0)
		usage();
	return v;
}

int main(int argc, char **argv)
{
	sigset_t stop;
	int used, rc;
	long count = -1, warmup = -1, window = 16, peers = 0;
	const char *mode, *go_file = NULL;

	detect_placement();
	/* Block the stop signals before EAL starts its threads, so that only serve's sigwait
	 * sees them. */
	sigemptyset(&stop);
	sigaddset(&stop, SIGTERM);
	sigaddset(&stop, SIGINT);
	if (pthread_sigmask(SIG_BLOCK, &stop, NULL) != 0)
		die("pthread_sigmask failed");

	used = rte_eal_init(argc, argv);
	if (used < 0) {
		fprintf(stderr, "dpdk_bench: rte_eal_init: %s\n", strerror(rte_errno));
		return 2;
	}
	argc -= used;
	argv += used;
	if (argc < 2)
		usage();
	mode = argv[1];
	for (int i = 2; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		if (strcmp(argv[i], "--count") == 0)
			count = parse_long(argv[++i]);
		else if (strcmp(argv[i], "--warmup") == 0)
			warmup = parse_long(argv[++i]);
		else if (strcmp(argv[i], "--window") == 0)
			window = parse_long(argv[++i]);
		else if (strcmp(argv[i], "--peers") == 0)
			peers = parse_long(argv[++i]);
		else if (strcmp(argv[i], "--go-file") == 0)
			go_file = argv[++i];
		else if (strcmp(argv[i], "--placement") == 0)
			snprintf(placement, sizeof(placement), "%s", argv[++i]);
		else
			usage();
	}
	if (window < 1 || window > MAX_WINDOW)
		die("--window must be 1..1024");
	/* Only serve waits for the stop signals; the other modes die of them at once. */
	if (strcmp(mode, "serve") != 0)
		pthread_sigmask(SIG_UNBLOCK, &stop, NULL);

	if (strcmp(mode, "serve") == 0) {
		rc = serve(&stop, (int)window);
	} else if (strcmp(mode, "rtt") == 0) {
		rc = rtt(count < 1 ? 10000 : (int)count, warmup < 0 ? 1000 : (int)warmup);
	} else if (strcmp(mode, "broadcast") == 0) {
		if (peers < 1)
			usage();
		rc = broadcast((int)peers, count < 1 ? 2000 : (int)count,
			       warmup < 0 ? 200 : (int)warmup, go_file);
	} else if (strcmp(mode, "async") == 0) {
		rc = async_bench(count < 1 ? 100000 : count, (int)window,
				 warmup < 0 ? 10000 : warmup);
	} else if (strcmp(mode, "oneway") == 0) {
		rc = oneway(count < 1 ? 200000 : count);
	} else {
		usage();
		rc = 2;
	}

	rte_eal_cleanup();
	return rc;
}
