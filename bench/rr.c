// SPDX-License-Identifier: Apache-2.0
// rr: tiny load tools for bench/run.py, in C so the client is never the
// bottleneck being measured.
//   rr serve PORT                     epoll echo server on [::]:PORT (dual stack)
//   rr rr HOST PORT SIZE SECONDS      one connection, SIZE-byte ping-pong
//   rr conn HOST PORT SECONDS         connect, 16-byte request/echo, close
//   rr connect HOST PORT SECONDS      connect() alone (its latency), close
//   rr hold HOST PORT COUNT FILE      open COUNT idle connections until FILE exists
// Results are one JSON line on stdout. Every loop is bounded in time.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int dial(const char *host, const char *port)
{
	struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res;
	int fd, one = 1;

	if (getaddrinfo(host, port, &hints, &res) != 0)
		return -1;
	fd = socket(res->ai_family, SOCK_STREAM, 0);
	if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
		close(fd);
		fd = -1;
	}
	if (fd >= 0)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	freeaddrinfo(res);
	return fd;
}

static int full(int fd, char *buf, size_t len, int writing)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = writing ? write(fd, buf + done, len - done) : read(fd, buf + done, len - done);
		if (n <= 0)
			return -1;
		done += n;
	}
	return 0;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static int serve(const char *port)
{
	struct sockaddr_in6 addr = {.sin6_family = AF_INET6, .sin6_port = htons(atoi(port))};
	struct epoll_event ev, events[256];
	int lfd = socket(AF_INET6, SOCK_STREAM, 0), ep = epoll_create1(0), zero = 0, one = 1;
	char buf[65536];

	setsockopt(lfd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) || listen(lfd, 4096)) {
		perror("rr serve");
		return 1;
	}
	printf("{\"listening\": %s}\n", port);
	fflush(stdout);
	ev.events = EPOLLIN;
	ev.data.fd = lfd;
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	for (;;) {
		int n = epoll_wait(ep, events, 256, -1);
		for (int i = 0; i < n; i++) {
			int fd = events[i].data.fd;
			if (fd == lfd) {
				int c = accept4(lfd, NULL, NULL, 0);
				if (c < 0)
					continue;
				setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
				ev.events = EPOLLIN;
				ev.data.fd = c;
				epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
				continue;
			}
			ssize_t got = read(fd, buf, sizeof(buf));
			if (got <= 0 || full(fd, buf, got, 1)) {
				epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
				close(fd);
			}
		}
	}
}

static int rr(const char *host, const char *port, size_t size, double seconds)
{
	size_t cap = 4 << 20, count = 0;
	double *lat = malloc(cap * sizeof(double)), start, end;
	char *buf = calloc(1, size);
	int fd = dial(host, port);

	if (fd < 0) {
		perror("rr connect");
		return 1;
	}
	start = now();
	end = start + seconds;
	while (count < cap) {
		double t = now();
		if (t > end)
			break;
		if (full(fd, buf, size, 1) || full(fd, buf, size, 0)) {
			perror("rr io");
			return 1;
		}
		lat[count++] = now() - t;
	}
	double elapsed = now() - start;
	qsort(lat, count, sizeof(double), cmp);
	printf("{\"tps\": %.1f, \"p50_us\": %.2f, \"p99_us\": %.2f, \"count\": %zu}\n",
	       count / elapsed, lat[count / 2] * 1e6, lat[(size_t)(count * 0.99)] * 1e6, count);
	close(fd);
	return 0;
}

static int conn(const char *host, const char *port, double seconds)
{
	char buf[16] = "GET";
	size_t count = 0, failed = 0;
	double start = now(), end = start + seconds;

	while (now() < end && failed < 1000) {
		int fd = dial(host, port);
		if (fd < 0 || full(fd, buf, sizeof(buf), 1) || full(fd, buf, sizeof(buf), 0))
			failed++;
		else
			count++;
		if (fd >= 0)
			close(fd);
	}
	printf("{\"cps\": %.1f, \"count\": %zu, \"failed\": %zu}\n", count / (now() - start), count,
	       failed);
	return failed ? 1 : 0;
}

/* connect() alone, then close: its latency (the connect hooks' cost plus
 * the handshake with whatever listens), and how many per second. */
static int connect_only(const char *host, const char *port, double seconds)
{
	size_t cap = 1 << 20, count = 0, failed = 0;
	double *lat = malloc(cap * sizeof(double)), start = now(), end = start + seconds;

	while (count < cap && now() < end && failed < 1000) {
		double t = now();
		int fd = dial(host, port);

		if (fd < 0) {
			failed++;
			continue;
		}
		lat[count++] = now() - t;
		close(fd);
	}
	if (!count) {
		fprintf(stderr, "connect: none succeeded\n");
		return 1;
	}
	double elapsed = now() - start;
	qsort(lat, count, sizeof(double), cmp);
	printf("{\"cps\": %.1f, \"p50_us\": %.2f, \"p99_us\": %.2f, \"count\": %zu, \"failed\": %zu}\n",
	       count / elapsed, lat[count / 2] * 1e6, lat[(size_t)(count * 0.99)] * 1e6, count, failed);
	return failed ? 1 : 0;
}

static int hold(const char *host, const char *port, int count, const char *file)
{
	struct rlimit lim = {.rlim_cur = count + 64, .rlim_max = count + 64};
	struct stat st;
	int opened = 0;
	double end = now() + 120;

	setrlimit(RLIMIT_NOFILE, &lim);

	for (int i = 0; i < count; i++)
		opened += dial(host, port) >= 0;
	printf("{\"opened\": %d}\n", opened);
	fflush(stdout);
	while (stat(file, &st) != 0 && now() < end)
		usleep(20000);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "serve"))
		return serve(argv[2]);
	if (argc == 6 && !strcmp(argv[1], "rr"))
		return rr(argv[2], argv[3], atoi(argv[4]), atof(argv[5]));
	if (argc == 5 && !strcmp(argv[1], "conn"))
		return conn(argv[2], argv[3], atof(argv[4]));
	if (argc == 5 && !strcmp(argv[1], "connect"))
		return connect_only(argv[2], argv[3], atof(argv[4]));
	if (argc == 6 && !strcmp(argv[1], "hold"))
		return hold(argv[2], argv[3], atoi(argv[4]), argv[5]);
	fprintf(stderr, "usage: rr serve PORT | rr HOST PORT SIZE SECS | conn HOST PORT SECS | "
		"connect HOST PORT SECS | hold HOST PORT N FILE\n");
	return 2;
}
