/*
 * dpdk_malloc_bench: the DPDK 22.11 side of memplane's heap benchmarks (bench/heap.sh). It
 * measures DPDK's own rte_malloc / rte_memzone the way memplane's bench programs
 * (malloc-heap/benches/) measure memplane, and prints the same `bench=` result lines.
 *
 * Usage (EAL arguments first, then `--`, then the mode and its options):
 *
 *   dpdk_malloc_bench EAL-ARGS -- idle
 *       Primary or secondary: prints `ready pid=P role=R` and waits until a line or EOF arrives
 *       on stdin. A primary serves the secondaries' heap growth meanwhile (DPDK's malloc_mp
 *       actions run on the EAL's IPC thread); a secondary is simply attached.
 *
 *   dpdk_malloc_bench EAL-ARGS -- pairs --size S --threads T [--count N] [--reps R]
 *       rte_malloc/rte_free pairs: each thread (the main lcore, and the first worker lcore when
 *       T = 2) keeps a working set of 16 live blocks of S bytes; one pair frees the oldest and
 *       allocates a new one (and writes its first byte). After the 16 blocks are allocated and
 *       N / 10 pairs run unmeasured, the threads start together and each times N pairs. Prints,
 *       per rep:
 *         bench=pairs impl=dpdk size=S threads=T n=N ns_per_pair=X mpairs_per_s=Y
 *       where X is the slowest thread's time per pair and Y = T * N / that time.
 *
 *   dpdk_malloc_bench EAL-ARGS -- memzone [--zones K] [--count N]
 *       Reserves K memzones of 64 bytes (`mzb-0` .. `mzb-(K-1)`), then times N lookups of the
 *       last one reserved and N lookups of a missing name; frees them. Prints
 *         bench=mz_lookup impl=dpdk zones=K n=N last_ns=X missing_ns=Y
 *
 *   dpdk_malloc_bench EAL-ARGS -- grow [--count N] [--warmup M] [--others K] [--size B] [--wait 1]
 *       Heap growth by exactly one page and the shrink that gives it back: first fills the heap
 *       until no free block of B bytes (default 1 MiB) is left, then M unmeasured and N measured
 *       rounds of `p = rte_malloc(B)` (the heap must grow: one 2 MiB page) and `rte_free(p)`
 *       (the page goes back), each timed alone. Checks with rte_malloc_get_socket_stats that
 *       the heap grew and shrank by exactly one page every round; rounds where it did not are
 *       counted as `bad`. In a secondary each growth is a request to the primary. Prints
 *         bench=grow impl=dpdk role=R others=K n=N grow_p50_us= grow_mean_us= grow_p90_us=
 *               free_p50_us= free_mean_us= free_p90_us= page=BYTES bad=X
 *       (`others` is the number of other secondaries attached, as told by the caller.) With
 *       `--wait 1` it prints `ready pid=P role=R` and waits for a line on stdin before the
 *       measurement (so that the caller can attach secondaries first), and for another line or
 *       EOF before it exits (so that they can detach first). With `--busy 1` the first worker
 *       lcore spins for the whole measurement (a dataplane core polling), so that the page
 *       mapping changes of the growths and frees run while another CPU runs this process.
 *
 * Build: cc -O2 -o dpdk_malloc_bench interop/dpdk_malloc_bench.c \
 *            $(pkg-config --cflags --libs libdpdk) -lpthread
 *
 * Our own code, written against the public rte_eal.h / rte_malloc.h / rte_memzone.h API of
 * DPDK 22.11.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_launch.h>
#include <rte_lcore.h>
#include <rte_malloc.h>
#include <rte_memzone.h>

#define RING 16

static void die(const char *what)
{
	fprintf(stderr, "dpdk_malloc_bench: %s\n", what);
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static long parse_long(const char *s)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 0);
	if (errno != 0 || *end != '\0' || v < 0)
		die("bad number");
	return v;
}

static const char *role_name(void)
{
	return rte_eal_process_type() == RTE_PROC_PRIMARY ? "primary" : "secondary";
}

/* ---- pairs -------------------------------------------------------------------------------- */

struct pairs_job {
	size_t size;
	long count;
	int threads;
	int leader;
	uint64_t elapsed_ns;
	int failed;
};

static atomic_int pairs_ready;
static atomic_int pairs_go;

/* One pair: free the oldest block, allocate a new one, write its first byte. */
static int pair(void **ring, long i, size_t size)
{
	unsigned k = (unsigned)i % RING;

	rte_free(ring[k]);
	ring[k] = rte_malloc(NULL, size, 0);
	if (ring[k] == NULL)
		return -1;
	*(volatile char *)ring[k] = (char)i;
	return 0;
}

static int pairs_worker(void *arg)
{
	struct pairs_job *job = arg;
	void *ring[RING] = { NULL };
	long warm = job->count / 10;
	uint64_t t0;

	for (int i = 0; i < RING && !job->failed; i++) {
		ring[i] = rte_malloc(NULL, job->size, 0);
		if (ring[i] == NULL)
			job->failed = 1;
		else
			*(volatile char *)ring[i] = 1;
	}
	for (long i = 0; i < warm && !job->failed; i++)
		job->failed = pair(ring, i, job->size) != 0;
	atomic_fetch_add(&pairs_ready, 1);
	if (job->leader) {
		while (atomic_load(&pairs_ready) < job->threads)
			;
		atomic_store(&pairs_go, 1);
	} else {
		while (!atomic_load(&pairs_go))
			;
	}
	t0 = now_ns();
	for (long i = 0; i < job->count && !job->failed; i++)
		job->failed = pair(ring, i, job->size) != 0;
	job->elapsed_ns = now_ns() - t0;
	for (int i = 0; i < RING; i++)
		rte_free(ring[i]);
	return job->failed ? -1 : 0;
}

static void run_pairs(size_t size, int threads, long count, long reps)
{
	unsigned worker = RTE_MAX_LCORE;

	if (threads < 1 || threads > 2)
		die("--threads must be 1 or 2");
	if (threads == 2) {
		worker = rte_get_next_lcore(-1, 1, 0);
		if (worker >= RTE_MAX_LCORE)
			die("two threads need two lcores (-l 0-1)");
	}
	for (long r = 0; r < reps; r++) {
		struct pairs_job jobs[2] = {
			{ .size = size, .count = count, .threads = threads, .leader = 1 },
			{ .size = size, .count = count, .threads = threads, .leader = 0 },
		};
		uint64_t slowest = 0;

		atomic_store(&pairs_ready, 0);
		atomic_store(&pairs_go, 0);
		if (threads == 2 && rte_eal_remote_launch(pairs_worker, &jobs[1], worker) != 0)
			die("rte_eal_remote_launch failed");
		pairs_worker(&jobs[0]);
		if (threads == 2)
			rte_eal_wait_lcore(worker);
		for (int t = 0; t < threads; t++) {
			if (jobs[t].failed)
				die("rte_malloc failed in the pairs loop");
			if (jobs[t].elapsed_ns > slowest)
				slowest = jobs[t].elapsed_ns;
		}
		printf("bench=pairs impl=dpdk size=%zu threads=%d n=%ld ns_per_pair=%.2f "
		       "mpairs_per_s=%.3f\n",
		       size, threads, count, (double)slowest / (double)count,
		       (double)threads * (double)count / ((double)slowest / 1e9) / 1e6);
		fflush(stdout);
	}
}

/* ---- memzone lookup ----------------------------------------------------------------------- */

static void run_memzone(long zones, long count)
{
	char name[RTE_MEMZONE_NAMESIZE];
	const struct rte_memzone **mz;
	uint64_t t0, last_ns, missing_ns;
	const struct rte_memzone *volatile found = NULL;

	mz = calloc((size_t)zones, sizeof(*mz));
	if (mz == NULL)
		die("out of memory");
	for (long i = 0; i < zones; i++) {
		snprintf(name, sizeof(name), "mzb-%ld", i);
		mz[i] = rte_memzone_reserve(name, 64, SOCKET_ID_ANY, 0);
		if (mz[i] == NULL) {
			fprintf(stderr, "dpdk_malloc_bench: memzone %ld: %s\n", i,
				rte_strerror(rte_errno));
			exit(1);
		}
	}
	snprintf(name, sizeof(name), "mzb-%ld", zones - 1);
	for (long i = 0; i < count / 10 + 1; i++)
		found = rte_memzone_lookup(name);
	t0 = now_ns();
	for (long i = 0; i < count; i++)
		found = rte_memzone_lookup(name);
	last_ns = now_ns() - t0;
	if (found != mz[zones - 1])
		die("lookup of the last memzone failed");
	t0 = now_ns();
	for (long i = 0; i < count; i++)
		found = rte_memzone_lookup("mzb-missing");
	missing_ns = now_ns() - t0;
	if (found != NULL)
		die("lookup of a missing memzone found one");
	printf("bench=mz_lookup impl=dpdk zones=%ld n=%ld last_ns=%.1f missing_ns=%.1f\n", zones,
	       count, (double)last_ns / (double)count, (double)missing_ns / (double)count);
	fflush(stdout);
	for (long i = 0; i < zones; i++)
		rte_memzone_free(mz[i]);
	free(mz);
}

/* ---- growth by one page ------------------------------------------------------------------- */

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static void heap_stats(uint64_t *total, uint64_t *greatest)
{
	struct rte_malloc_socket_stats st;

	*total = 0;
	*greatest = 0;
	for (unsigned i = 0; i < rte_socket_count(); i++) {
		int s = rte_socket_id_by_idx(i);

		if (rte_malloc_get_socket_stats(s, &st) == 0) {
			*total += st.heap_totalsz_bytes;
			if (st.greatest_free_size > *greatest)
				*greatest = st.greatest_free_size;
		}
	}
}

static void summary(const char *what, uint64_t *v, long n)
{
	double mean = 0;

	qsort(v, (size_t)n, sizeof(*v), cmp_u64);
	for (long i = 0; i < n; i++)
		mean += (double)v[i];
	mean /= (double)n;
	printf(" %s_p50_us=%.1f %s_mean_us=%.1f %s_p90_us=%.1f", what, (double)v[n / 2] / 1e3, what,
	       mean / 1e3, what, (double)v[n * 9 / 10] / 1e3);
}

static atomic_int busy_stop;

/* A worker lcore that polls until told to stop. */
static int busy_loop(void *arg)
{
	volatile uint64_t spins = 0;

	(void)arg;
	while (!atomic_load_explicit(&busy_stop, memory_order_relaxed))
		spins++;
	return 0;
}

static void run_grow(long count, long warmup, long others, size_t size, int busy)
{
	unsigned worker = RTE_MAX_LCORE;

	const uint64_t page = 2ull << 20;
	void *fill[64];
	int nfill = 0;
	uint64_t total, greatest, t0, t1, before, after;
	uint64_t *g = calloc((size_t)count, sizeof(uint64_t));
	uint64_t *f = calloc((size_t)count, sizeof(uint64_t));
	long bad = 0;

	if (g == NULL || f == NULL)
		die("out of memory");
	/* Leave no free block that could hold `size` without growing. */
	heap_stats(&total, &greatest);
	while (greatest >= size && nfill < 64) {
		fill[nfill] = rte_malloc(NULL, greatest - 1024, 0);
		if (fill[nfill] == NULL)
			die("filler rte_malloc failed");
		nfill++;
		heap_stats(&total, &greatest);
	}
	if (greatest >= size)
		die("could not fill the heap");
	if (busy) {
		worker = rte_get_next_lcore(-1, 1, 0);
		if (worker >= RTE_MAX_LCORE)
			die("--busy needs a worker lcore (-l 0-1)");
		atomic_store(&busy_stop, 0);
		if (rte_eal_remote_launch(busy_loop, NULL, worker) != 0)
			die("cannot launch the busy lcore");
	}
	for (long i = 0; i < warmup + count; i++) {
		void *p;

		heap_stats(&before, &greatest);
		t0 = now_ns();
		p = rte_malloc(NULL, size, 0);
		t1 = now_ns();
		if (p == NULL)
			die("rte_malloc of the growth failed");
		heap_stats(&after, &greatest);
		if (i >= warmup) {
			g[i - warmup] = t1 - t0;
			if (after - before != page)
				bad++;
		}
		*(volatile char *)p = 1;
		before = after;
		t0 = now_ns();
		rte_free(p);
		t1 = now_ns();
		heap_stats(&after, &greatest);
		if (i >= warmup) {
			f[i - warmup] = t1 - t0;
			if (before - after != page)
				bad++;
		}
	}
	if (busy) {
		atomic_store(&busy_stop, 1);
		rte_eal_wait_lcore(worker);
	}
	printf("bench=grow impl=dpdk role=%s others=%ld n=%ld", role_name(), others, count);
	summary("grow", g, count);
	summary("free", f, count);
	printf(" page=%llu bad=%ld\n", (unsigned long long)page, bad);
	fflush(stdout);
	for (int i = 0; i < nfill; i++)
		rte_free(fill[i]);
	free(g);
	free(f);
}

/* ---- main --------------------------------------------------------------------------------- */

static void usage(void)
{
	fprintf(stderr,
		"usage: dpdk_malloc_bench EAL-ARGS -- idle | pairs --size S --threads T [--count N]"
		" [--reps R] | memzone [--zones K] [--count N] | grow [--count N] [--warmup M] [--busy 1]"
		" [--others K] [--size B]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	int used;
	long count = -1, reps = 3, threads = 1, zones = 2000, warmup = 20, others = 0, wait = 0, busy = 0;
	char line[64];
	size_t size = 0;
	const char *mode;

	used = rte_eal_init(argc, argv);
	if (used < 0) {
		fprintf(stderr, "dpdk_malloc_bench: rte_eal_init: %s\n", rte_strerror(rte_errno));
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
		else if (strcmp(argv[i], "--reps") == 0)
			reps = parse_long(argv[++i]);
		else if (strcmp(argv[i], "--threads") == 0)
			threads = parse_long(argv[++i]);
		else if (strcmp(argv[i], "--size") == 0)
			size = (size_t)parse_long(argv[++i]);
		else if (strcmp(argv[i], "--zones") == 0)
			zones = parse_long(argv[++i]);
		else if (strcmp(argv[i], "--warmup") == 0)
			warmup = parse_long(argv[++i]);
		else if (strcmp(argv[i], "--others") == 0)
			others = parse_long(argv[++i]);
		else if (strcmp(argv[i], "--wait") == 0)
			wait = parse_long(argv[++i]);
		else if (strcmp(argv[i], "--busy") == 0)
			busy = parse_long(argv[++i]);
		else
			usage();
	}

	if (strcmp(mode, "idle") == 0) {
		printf("ready pid=%d role=%s\n", (int)getpid(), role_name());
		fflush(stdout);
		if (fgets(line, sizeof(line), stdin) == NULL)
			(void)0;
	} else if (strcmp(mode, "pairs") == 0) {
		if (size == 0)
			usage();
		run_pairs(size, (int)threads, count < 0 ? 2000000 : count, reps);
	} else if (strcmp(mode, "memzone") == 0) {
		if (zones < 1)
			usage();
		run_memzone(zones, count < 0 ? 10000 : count);
	} else if (strcmp(mode, "grow") == 0) {
		if (wait) {
			printf("ready pid=%d role=%s\n", (int)getpid(), role_name());
			fflush(stdout);
			if (fgets(line, sizeof(line), stdin) == NULL)
				(void)0;
		}
		run_grow(count < 0 ? 200 : count, warmup, others, size == 0 ? (1u << 20) : size,
			 busy != 0);
		if (wait && fgets(line, sizeof(line), stdin) == NULL)
			(void)0;
	} else {
		usage();
	}
	rte_eal_cleanup();
	return 0;
}
