/*
 * bench/cpu_scaling.c: how much a second busy vCPU slows the first, with no allocator and no
 * shared memory at all. Two loops run on one thread (pinned to CPU 0), then on two threads
 * (pinned to CPUs 0 and 1) at once, and the program prints the two-thread speedup of each:
 *   - chain: a multiply-add chain in registers (latency bound, touches no memory);
 *   - l1:    loads and stores into a 4 KiB array of the thread's own (L1 resident).
 * On a machine whose CPUs do not share a core both speedups are close to 2x; docs/heap-
 * benchmark.md (section 2) quotes what this VM gives, the ceiling for an allocator's
 * thread-cache loop.
 *
 *   cc -O2 -pthread bench/cpu_scaling.c -o /tmp/cpu_scaling && /tmp/cpu_scaling [rounds]
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

struct job {
	int cpu;
	int kind; /* 0 chain, 1 l1 */
	double ns_per_iter;
};

static void pin(int cpu)
{
	cpu_set_t s;
	CPU_ZERO(&s);
	CPU_SET(cpu, &s);
	sched_setaffinity(0, sizeof(s), &s);
}

static void *run(void *arg)
{
	struct job *j = arg;
	pin(j->cpu);
	if (j->kind == 0) {
		const long n = 300000000;
		volatile uint64_t sink;
		uint64_t y = 1;
		double t = now_ns();
		for (long i = 0; i < n; i++)
			y = y * 6364136223846793005ULL + 1442695040888963407ULL;
		j->ns_per_iter = (now_ns() - t) / n;
		sink = y;
		(void)sink;
	} else {
		const long n = 20000000;
		static __thread uint64_t buf[512];
		uint64_t acc = 0;
		double t = now_ns();
		for (long i = 0; i < n; i++) {
			uint64_t k = (i * 7) & 511;
			buf[k] += i;
			acc += buf[(k + 13) & 511];
			buf[(k * 3) & 511] ^= acc;
			acc += buf[(k + 101) & 511];
		}
		j->ns_per_iter = (now_ns() - t) / n;
		if (acc == 42)
			puts("");
	}
	return NULL;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 4;
	const char *names[] = { "chain", "l1" };
	for (int r = 0; r < rounds; r++) {
		for (int kind = 0; kind < 2; kind++) {
			struct job one = { 0, kind, 0 }, a = { 0, kind, 0 }, b = { 1, kind, 0 };
			pthread_t t0, t1;
			pthread_create(&t0, NULL, run, &one);
			pthread_join(t0, NULL);
			pthread_create(&t0, NULL, run, &a);
			pthread_create(&t1, NULL, run, &b);
			pthread_join(t0, NULL);
			pthread_join(t1, NULL);
			double two = a.ns_per_iter > b.ns_per_iter ? a.ns_per_iter : b.ns_per_iter;
			printf("bench=cpu_scaling loop=%s one_thread_ns=%.3f two_threads_ns=%.3f speedup=%.2f\n",
			       names[kind], one.ns_per_iter, two, 2 * one.ns_per_iter / two);
		}
	}
	return 0;
}
