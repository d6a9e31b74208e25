/*
 * unix_pingpong: the floor under every IPC round trip in memplane's benchmark (bench/ipc.sh).
 * Two single-threaded processes bounce one datagram over AF_UNIX SOCK_DGRAM sockets bound to
 * paths, addressed by path on every send (as DPDK's and memplane's channels do), each blocking in
 * recvfrom. The datagram is as long as a DPDK 22.11 rte_mp message on the wire (332 bytes) unless
 * --size says otherwise. No threads hand work to each other, no fds, no credentials: this is what
 * the kernel alone costs.
 *
 * With --peers K (1-16) the first process broadcasts instead: each round it sends one datagram to
 * each of K echoing processes, one after the other, then receives their K answers (what a
 * primary's request to K secondaries costs the kernel, with no decoding and no handlers).
 *
 * Usage: unix_pingpong [--count N] [--warmup M] [--size BYTES] [--peers K] [--placement NAME]
 * Prints: bench=rtt impl=bare placement=P n=N min_us= p50_us= p90_us= p99_us= max_us=
 * (bench=broadcast ... secondaries=K with --peers; placement defaults to `cpuN` when pinned to
 * one CPU, `float` when free on every online CPU).
 *
 * Build: cc -O2 -o unix_pingpong interop/unix_pingpong.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_SIZE 4096
#define MAX_PEERS 16

/* What a failing run leaves behind, removed at exit by the process that made it. */
static char cleanup_dir[64], cleanup_a[128], cleanup_b[MAX_PEERS][128];
static pid_t cleanup_owner;

static void cleanup(void)
{
	if (getpid() != cleanup_owner || cleanup_dir[0] == 0)
		return;
	unlink(cleanup_a);
	for (int i = 0; i < MAX_PEERS; i++)
		if (cleanup_b[i][0] != 0)
			unlink(cleanup_b[i]);
	rmdir(cleanup_dir);
}

static void die(const char *what)
{
	fprintf(stderr, "unix_pingpong: %s: %s\n", what, strerror(errno));
	exit(2);
}

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void placement_of_self(char *out, size_t len)
{
	cpu_set_t set;
	long online = sysconf(_SC_NPROCESSORS_ONLN);
	int n, used;

	CPU_ZERO(&set);
	if (sched_getaffinity(0, sizeof(set), &set) != 0) {
		snprintf(out, len, "unknown");
		return;
	}
	n = CPU_COUNT(&set);
	if (n == online && n > 1) {
		snprintf(out, len, "float");
		return;
	}
	used = snprintf(out, len, n == 1 ? "cpu" : "cpus");
	for (int c = 0, first = 1; c < CPU_SETSIZE && used < (int)len - 8; c++) {
		if (!CPU_ISSET(c, &set))
			continue;
		used += snprintf(out + used, len - (size_t)used, "%s%d", first ? "" : ",", c);
		first = 0;
	}
}

static int bound_socket(const char *path, struct sockaddr_un *addr)
{
	int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		die("socket");
	memset(addr, 0, sizeof(*addr));
	addr->sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(addr->sun_path)) {
		errno = ENAMETOOLONG;
		die("socket path");
	}
	strcpy(addr->sun_path, path);
	if (bind(fd, (struct sockaddr *)addr, sizeof(*addr)) != 0)
		die("bind");
	return fd;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static double pct_us(const uint64_t *s, int n, double p)
{
	int i = (int)((double)(n - 1) * p + 0.5);

	if (i > n - 1)
		i = n - 1;
	return (double)s[i] / 1000.0;
}

/* The echoing side: bounces every datagram back until a 1-byte one arrives. */
static void echo(int fd, const struct sockaddr_un *to, size_t size)
{
	char buf[MAX_SIZE];

	for (;;) {
		ssize_t n = recv(fd, buf, sizeof(buf), 0);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("recv (echo)");
		}
		if (n == 1)
			_exit(0);
		if (sendto(fd, buf, size, 0, (const struct sockaddr *)to, sizeof(*to)) < 0)
			die("sendto (echo)");
	}
}

int main(int argc, char **argv)
{
	char dir[] = "/tmp/unix-pingpong.XXXXXX", pa[128], placement[64], buf[MAX_SIZE];
	struct sockaddr_un a, b[MAX_PEERS];
	long count = 10000, warmup = 1000, size = 332, peers = 0;
	uint64_t *s;
	int fa, fb[MAX_PEERS], status;
	pid_t child[MAX_PEERS];

	placement_of_self(placement, sizeof(placement));
	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			goto usage;
		if (strcmp(argv[i], "--count") == 0)
			count = strtol(argv[++i], NULL, 10);
		else if (strcmp(argv[i], "--warmup") == 0)
			warmup = strtol(argv[++i], NULL, 10);
		else if (strcmp(argv[i], "--size") == 0)
			size = strtol(argv[++i], NULL, 10);
		else if (strcmp(argv[i], "--peers") == 0)
			peers = strtol(argv[++i], NULL, 10);
		else if (strcmp(argv[i], "--placement") == 0)
			snprintf(placement, sizeof(placement), "%s", argv[++i]);
		else
			goto usage;
	}
	if (count < 1 || warmup < 0 || size < 2 || size > MAX_SIZE || peers < 0 || peers > MAX_PEERS)
		goto usage;
	int broadcast = peers > 0, k = broadcast ? (int)peers : 1;
	s = calloc((size_t)count, sizeof(*s));
	if (s == NULL)
		die("calloc");
	memset(buf, 0x5a, sizeof(buf));

	if (mkdtemp(dir) == NULL)
		die("mkdtemp");
	snprintf(pa, sizeof(pa), "%s/a", dir);
	snprintf(cleanup_dir, sizeof(cleanup_dir), "%s", dir);
	snprintf(cleanup_a, sizeof(cleanup_a), "%s", pa);
	cleanup_owner = getpid();
	atexit(cleanup);
	fa = bound_socket(pa, &a);
	for (int j = 0; j < k; j++) {
		char pb[128];

		snprintf(pb, sizeof(pb), "%s/b%d", dir, j);
		snprintf(cleanup_b[j], sizeof(cleanup_b[j]), "%s", pb);
		fb[j] = bound_socket(pb, &b[j]);
	}

	for (int j = 0; j < k; j++) {
		child[j] = fork();
		if (child[j] < 0)
			die("fork");
		if (child[j] == 0) {
			/* The echo process goes with its parent, whichever way the parent ends. */
			if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != cleanup_owner)
				_exit(1);
			close(fa);
			echo(fb[j], &a, (size_t)size);
		}
		close(fb[j]);
	}

	for (long i = 0; i < warmup + count; i++) {
		uint64_t t0 = now_ns(), dt;
		ssize_t n;

		for (int j = 0; j < k; j++)
			if (sendto(fa, buf, (size_t)size, 0, (struct sockaddr *)&b[j], sizeof(b[j])) < 0)
				die("sendto");
		for (int j = 0; j < k; j++) {
			do {
				n = recv(fa, buf, sizeof(buf), 0);
			} while (n < 0 && errno == EINTR);
			if (n < 0)
				die("recv");
		}
		dt = now_ns() - t0;
		if (i >= warmup)
			s[i - warmup] = dt;
	}
	for (int j = 0; j < k; j++) {
		if (sendto(fa, buf, 1, 0, (struct sockaddr *)&b[j], sizeof(b[j])) < 0)
			kill(child[j], SIGKILL);
		waitpid(child[j], &status, 0);
	}
	close(fa);
	cleanup();
	cleanup_dir[0] = 0;

	qsort(s, (size_t)count, sizeof(*s), cmp_u64);
	if (broadcast)
		printf("bench=broadcast impl=bare placement=%s secondaries=%ld ", placement, peers);
	else
		printf("bench=rtt impl=bare placement=%s ", placement);
	printf("n=%ld min_us=%.1f p50_us=%.1f p90_us=%.1f p99_us=%.1f max_us=%.1f size=%ld\n",
	       count, pct_us(s, (int)count, 0), pct_us(s, (int)count, 0.5),
	       pct_us(s, (int)count, 0.9), pct_us(s, (int)count, 0.99), pct_us(s, (int)count, 1),
	       size);
	free(s);
	return 0;

usage:
	fprintf(stderr,
		"usage: unix_pingpong [--count N] [--warmup M] [--size BYTES] [--peers K] "
		"[--placement NAME]\n");
	return 2;
}
