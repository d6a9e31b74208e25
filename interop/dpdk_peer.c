/*
 * dpdk_peer: a small DPDK program that talks to memplane over DPDK's multi-process channel
 * (rte_mp_*), used by memplane's interop tests (tests/dpdk_interop.rs).
 *
 * Usage (EAL arguments first, then `--`, then the mode):
 *
 *   dpdk_peer EAL-ARGS -- serve
 *       Registers the action `dpdk_echo`. For every message or request with that name it prints
 *       `recv name=... param=<hex> fds=N`, then `got fdI="<first bytes>"` for each received fd
 *       (and closes them), then replies with the same name, the same param and one memfd that
 *       holds `from-dpdk`, and prints `replied rc=R`. (An rte_mp action cannot tell a one-way
 *       message from a request, so it always replies; a reply to a one-way message fails
 *       harmlessly once the sender is gone.) Prints `ready` after init, then runs until SIGTERM
 *       or SIGINT, calls rte_eal_cleanup and exits 0.
 *
 *   dpdk_peer EAL-ARGS -- broadcast NAME TEXT [--wait-peers N] [--wait-stdin]
 *                         [--timeout-ms MS] [--wait-timeout-ms MS]
 *       Must run as the primary. Prints `ready` after init; with --wait-peers N (default 1) waits
 *       until at least N secondary sockets (`mp_socket_*`) exist in the runtime directory
 *       (prints `peers=K`); with --wait-stdin then waits for one line on stdin (a go signal, so
 *       a test can start broadcasting only once its secondary has registered its actions).
 *       Then sends the request NAME with param "ping" and one memfd holding TEXT to every
 *       secondary (rte_mp_request_sync, default timeout 5000 ms) and prints
 *       `nb_sent=X nb_received=Y`, and for each reply
 *       `reply name=... param=<hex> fds=N fd0="<first bytes>" ...`.
 *       Exits 0 if nb_received == nb_sent >= 1, else 1.
 *
 *   dpdk_peer EAL-ARGS -- send NAME TEXT [--wait-peers N] [--wait-stdin] [--wait-timeout-ms MS]
 *       As broadcast, but sends the one-way message NAME with param "note" and one memfd holding
 *       TEXT to every secondary (rte_mp_sendmsg) and prints `sendmsg rc=R`; exits 0 if R == 0.
 *
 * Build: cc -O2 -o dpdk_peer interop/dpdk_peer.c $(pkg-config --cflags --libs libdpdk)
 *
 * Written against the public rte_eal.h API of DPDK 22.11.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <glob.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <rte_eal.h>
#include <rte_errno.h>

#define ECHO_ACTION "dpdk_echo"
#define ECHO_REPLY_TEXT "from-dpdk"
#define PEEK_LEN 64

static void die(const char *what)
{
	fprintf(stderr, "dpdk_peer: %s\n", what);
	exit(2);
}

/* Prints `s` (len bytes) inside double quotes, escaping what is not printable ASCII. */
static void print_escaped(FILE *f, const unsigned char *s, size_t len)
{
	fputc('"', f);
	for (size_t i = 0; i < len; i++) {
		unsigned char c = s[i];
		if (c == '"' || c == '\\')
			fprintf(f, "\\%c", c);
		else if (c >= 0x20 && c < 0x7f)
			fputc(c, f);
		else
			fprintf(f, "\\x%02x", c);
	}
	fputc('"', f);
}

static void print_hex(FILE *f, const uint8_t *b, int len)
{
	for (int i = 0; i < len; i++)
		fprintf(f, "%02x", b[i]);
}

/* Prints ` fdI="<first bytes of fd>"`, reading from offset 0. */
static void print_fd_peek(FILE *f, int i, int fd)
{
	unsigned char buf[PEEK_LEN];
	ssize_t n = pread(fd, buf, sizeof(buf), 0);

	fprintf(f, " fd%d=", i);
	if (n < 0)
		fprintf(f, "<%s>", strerror(errno));
	else
		print_escaped(f, buf, (size_t)n);
}

/* A memfd holding `text`, or -1. */
static int memfd_with(const char *text)
{
	int fd = memfd_create("dpdk-peer", MFD_CLOEXEC);
	size_t len = strlen(text), done = 0;

	if (fd < 0)
		return -1;
	while (done < len) {
		ssize_t n = write(fd, text + done, len - done);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			close(fd);
			return -1;
		}
		done += (size_t)n;
	}
	return fd;
}

/* ---- serve ---------------------------------------------------------------------------- */

static int echo_action(const struct rte_mp_msg *msg, const void *peer)
{
	struct rte_mp_msg reply;
	int rc;

	printf("recv name=%s param=", msg->name);
	print_hex(stdout, msg->param, msg->len_param);
	printf(" fds=%d\n", msg->num_fds);
	for (int i = 0; i < msg->num_fds && i < RTE_MP_MAX_FD_NUM; i++) {
		printf("got");
		print_fd_peek(stdout, i, msg->fds[i]);
		printf("\n");
		close(msg->fds[i]);
	}
	fflush(stdout);

	memset(&reply, 0, sizeof(reply));
	snprintf(reply.name, sizeof(reply.name), "%s", msg->name);
	reply.len_param = msg->len_param;
	memcpy(reply.param, msg->param, (size_t)msg->len_param);
	reply.fds[0] = memfd_with(ECHO_REPLY_TEXT);
	reply.num_fds = reply.fds[0] >= 0 ? 1 : 0;
	rc = rte_mp_reply(&reply, (const char *)peer);
	if (reply.num_fds)
		close(reply.fds[0]);
	printf("replied rc=%d\n", rc);
	fflush(stdout);
	return 0;
}

static int serve(const sigset_t *stop)
{
	int sig;

	if (rte_mp_action_register(ECHO_ACTION, echo_action) < 0) {
		fprintf(stderr, "dpdk_peer: rte_mp_action_register: %s\n", strerror(rte_errno));
		return 2;
	}
	printf("ready role=%s dir=%s\n",
	       rte_eal_process_type() == RTE_PROC_PRIMARY ? "primary" : "secondary",
	       rte_eal_get_runtime_dir());
	fflush(stdout);
	while (sigwait(stop, &sig) != 0)
		;
	printf("stopping signal=%d\n", sig);
	fflush(stdout);
	rte_mp_action_unregister(ECHO_ACTION);
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

static long long now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

struct bcast_opts {
	int send_only; /* `send` mode: rte_mp_sendmsg instead of rte_mp_request_sync */
	const char *name;
	const char *text;
	int wait_peers;
	int wait_stdin;
	long timeout_ms;
	long wait_timeout_ms;
};

/* Prints `ready`, waits for the secondaries (and the go line); 0 when it is time to send. */
static int wait_for_peers(const struct bcast_opts *o)
{
	long long give_up;
	int n;

	if (rte_eal_process_type() != RTE_PROC_PRIMARY) {
		fprintf(stderr, "dpdk_peer: broadcast and send must run as the primary\n");
		return 2;
	}
	printf("ready role=primary dir=%s\n", rte_eal_get_runtime_dir());
	fflush(stdout);

	/* Bounded poll for the secondaries' sockets. */
	give_up = now_ms() + o->wait_timeout_ms;
	while ((n = count_secondaries()) < o->wait_peers) {
		struct timespec step = { 0, 10 * 1000 * 1000 };
		if (now_ms() > give_up) {
			printf("timeout waiting for %d peers (found %d)\n", o->wait_peers, n);
			fflush(stdout);
			return 1;
		}
		nanosleep(&step, NULL);
	}
	printf("peers=%d\n", n);
	fflush(stdout);
	if (o->wait_stdin) {
		char line[64];
		if (fgets(line, sizeof(line), stdin) == NULL) {
			printf("stdin closed before go\n");
			fflush(stdout);
			return 1;
		}
	}
	return 0;
}

/* Fills `m` with NAME, `param` and one memfd holding TEXT (the caller closes m->fds[0]). */
static void fill_msg(struct rte_mp_msg *m, const struct bcast_opts *o, const char *param)
{
	memset(m, 0, sizeof(*m));
	snprintf(m->name, sizeof(m->name), "%s", o->name);
	m->len_param = (int)strlen(param);
	memcpy(m->param, param, (size_t)m->len_param);
	m->fds[0] = memfd_with(o->text);
	if (m->fds[0] < 0)
		die("memfd_create failed");
	m->num_fds = 1;
}

/* `send`: one-way message "note" with a memfd to every secondary. */
static int send_note(const struct bcast_opts *o)
{
	struct rte_mp_msg msg;
	int rc = wait_for_peers(o);

	if (rc != 0)
		return rc;
	fill_msg(&msg, o, "note");
	rc = rte_mp_sendmsg(&msg);
	close(msg.fds[0]);
	printf("sendmsg rc=%d\n", rc);
	fflush(stdout);
	return rc == 0 ? 0 : 1;
}

/* `broadcast`: request "ping" with a memfd to every secondary; prints the replies. */
static int broadcast(const struct bcast_opts *o)
{
	struct rte_mp_msg req;
	struct rte_mp_reply reply;
	struct timespec ts;
	int rc = wait_for_peers(o), ok;

	if (rc != 0)
		return rc;
	fill_msg(&req, o, "ping");
	ts.tv_sec = o->timeout_ms / 1000;
	ts.tv_nsec = (o->timeout_ms % 1000) * 1000000L;

	memset(&reply, 0, sizeof(reply));
	rc = rte_mp_request_sync(&req, &reply, &ts);
	close(req.fds[0]);
	printf("request rc=%d\n", rc);
	printf("nb_sent=%d nb_received=%d\n", reply.nb_sent, reply.nb_received);
	for (int i = 0; i < reply.nb_received; i++) {
		const struct rte_mp_msg *m = &reply.msgs[i];
		printf("reply name=%s param=", m->name);
		print_hex(stdout, m->param, m->len_param);
		printf(" fds=%d", m->num_fds);
		for (int j = 0; j < m->num_fds && j < RTE_MP_MAX_FD_NUM; j++) {
			print_fd_peek(stdout, j, m->fds[j]);
			close(m->fds[j]);
		}
		printf("\n");
	}
	fflush(stdout);
	ok = rc == 0 && reply.nb_sent >= 1 && reply.nb_received == reply.nb_sent;
	free(reply.msgs);
	return ok ? 0 : 1;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: dpdk_peer EAL-ARGS -- serve\n"
		"       dpdk_peer EAL-ARGS -- broadcast NAME TEXT [--wait-peers N] [--wait-stdin]\n"
		"                             [--timeout-ms MS] [--wait-timeout-ms MS]\n"
		"       dpdk_peer EAL-ARGS -- send NAME TEXT [--wait-peers N] [--wait-stdin]\n"
		"                             [--wait-timeout-ms MS]\n");
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

	/* Block the stop signals before EAL starts its threads, so they all inherit the mask and
	 * only serve()'s sigwait sees them. */
	sigemptyset(&stop);
	sigaddset(&stop, SIGTERM);
	sigaddset(&stop, SIGINT);
	if (pthread_sigmask(SIG_BLOCK, &stop, NULL) != 0)
		die("pthread_sigmask failed");

	used = rte_eal_init(argc, argv);
	if (used < 0) {
		fprintf(stderr, "dpdk_peer: rte_eal_init: %s\n", strerror(rte_errno));
		return 2;
	}
	argc -= used;
	argv += used;
	/* argv[0] is now the last EAL argument (or the program name); the mode follows. */
	if (argc < 2)
		usage();

	if (strcmp(argv[1], "serve") == 0 && argc == 2) {
		rc = serve(&stop);
	} else if ((strcmp(argv[1], "broadcast") == 0 || strcmp(argv[1], "send") == 0) &&
		   argc >= 4) {
		struct bcast_opts o = {
			.send_only = strcmp(argv[1], "send") == 0,
			.name = argv[2],
			.text = argv[3],
			.wait_peers = 1,
			.wait_stdin = 0,
			.timeout_ms = 5000,
			.wait_timeout_ms = 30000,
		};
		for (int i = 4; i < argc; i++) {
			if (strcmp(argv[i], "--wait-peers") == 0 && i + 1 < argc)
				o.wait_peers = (int)parse_long(argv[++i]);
			else if (strcmp(argv[i], "--wait-stdin") == 0)
				o.wait_stdin = 1;
			else if (strcmp(argv[i], "--timeout-ms") == 0 && i + 1 < argc)
				o.timeout_ms = parse_long(argv[++i]);
			else if (strcmp(argv[i], "--wait-timeout-ms") == 0 && i + 1 < argc)
				o.wait_timeout_ms = parse_long(argv[++i]);
			else
				usage();
		}
		if (strlen(o.name) >= RTE_MP_MAX_NAME_LEN)
			die("action name too long");
		rc = o.send_only ? send_note(&o) : broadcast(&o);
	} else {
		usage();
	}

	rte_eal_cleanup();
	return rc;
}
