/*
 * netbench: TCP throughput and request/response rate between a guest and the host, for
 * the user-mode networking benchmark (scripts/bench-usernet.ts). The same binary runs on
 * both sides: built static, it goes into the guest on a disk image.
 *
 *   netbench server ADDR PORT
 *       Accept connections one at a time on ADDR:PORT. Each starts with an 8-byte
 *       request: a mode byte ('t', 'r' or 'e'), 3 bytes of padding and a 32-bit
 *       big-endian size. 't' (client transmits): read until EOF. 'r' (client receives):
 *       write `size`-byte buffers until the client closes. 'e' (echo): read `size`
 *       bytes, write them back, until EOF. Prints "ready" once listening.
 *   netbench client ADDR PORT MODE SECONDS [SIZE]
 *       MODE tx: send SIZE-byte writes (default 65536) for SECONDS; rx: receive for
 *       SECONDS; rr: SIZE-byte (default 1) request/response round trips for SECONDS.
 *       Prints one line: "tx bytes=N seconds=S mbit_per_s=R" or
 *       "rr transactions=N seconds=S per_s=R".
 *
 * Each side times itself with CLOCK_MONOTONIC. Errors go to stderr; exit status 1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "netbench: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* Move all len bytes (write, or read when reading): 1 done; 0 EOF first (reading); -1 error. */
static int full_io(int fd, char *buf, size_t len, int reading)
{
	while (len > 0) {
		ssize_t n = reading ? read(fd, buf, len) : write(fd, buf, len);
		if (n == 0 && reading)
			return 0;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 1;
}

static int full_write(int fd, const char *buf, size_t len)
{
	return full_io(fd, (char *)buf, len, 0) == 1 ? 0 : -1;
}

static int full_read(int fd, char *buf, size_t len)
{
	return full_io(fd, buf, len, 1);
}

static struct sockaddr_in address(const char *addr, const char *port)
{
	struct sockaddr_in sa;
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)atoi(port));
	if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1) {
		fprintf(stderr, "netbench: bad IPv4 address %s\n", addr);
		exit(1);
	}
	return sa;
}

static void nodelay(int fd)
{
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static void serve(const char *addr, const char *port)
{
	struct sockaddr_in sa = address(addr, port);
	int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	if (s < 0)
		die("socket");
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(s, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("bind");
	if (listen(s, 16) < 0)
		die("listen");
	printf("ready\n");
	fflush(stdout);
	static char buf[1 << 20];
	for (;;) {
		int c = accept(s, NULL, NULL);
		if (c < 0) {
			if (errno == EINTR)
				continue;
			die("accept");
		}
		nodelay(c);
		unsigned char req[8];
		if (full_read(c, (char *)req, 8) != 1) {
			close(c);
			continue;
		}
		uint32_t size = (uint32_t)req[4] << 24 | (uint32_t)req[5] << 16 | (uint32_t)req[6] << 8 | req[7];
		if (size == 0 || size > sizeof(buf))
			size = 65536;
		if (req[0] == 't') {
			while (read(c, buf, sizeof(buf)) > 0)
				;
		} else if (req[0] == 'r') {
			memset(buf, 'r', size);
			while (full_write(c, buf, size) == 0)
				;
		} else if (req[0] == 'e') {
			while (full_read(c, buf, size) == 1 && full_write(c, buf, size) == 0)
				;
		}
		close(c);
	}
}

static int client(const char *addr, const char *port, const char *mode, double seconds, uint32_t size)
{
	struct sockaddr_in sa = address(addr, port);
	int s = socket(AF_INET, SOCK_STREAM, 0);
	if (s < 0)
		die("socket");
	if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("connect");
	nodelay(s);
	char m = strcmp(mode, "tx") == 0 ? 't' : strcmp(mode, "rx") == 0 ? 'r' : strcmp(mode, "rr") == 0 ? 'e' : 0;
	if (m == 0) {
		fprintf(stderr, "netbench: mode %s is not tx, rx or rr\n", mode);
		return 1;
	}
	if (size == 0)
		size = m == 'e' ? 1 : 65536;
	unsigned char req[8] = { (unsigned char)m, 0, 0, 0, (unsigned char)(size >> 24), (unsigned char)(size >> 16),
				 (unsigned char)(size >> 8), (unsigned char)size };
	if (full_write(s, (char *)req, 8) < 0)
		die("write request");
	static char buf[1 << 20];
	if (size > sizeof(buf))
		size = sizeof(buf);
	memset(buf, 't', size);
	double t0 = now(), t = t0;
	unsigned long long bytes = 0, transactions = 0;
	if (m == 't') {
		while ((t = now()) - t0 < seconds) {
			if (full_write(s, buf, size) < 0)
				die("write");
			bytes += size;
		}
		shutdown(s, SHUT_WR);
		while (read(s, buf, sizeof(buf)) > 0)
			;
		t = now();
	} else if (m == 'r') {
		while ((t = now()) - t0 < seconds) {
			ssize_t n = read(s, buf, sizeof(buf));
			if (n <= 0)
				die("read");
			bytes += (unsigned long long)n;
		}
	} else {
		while ((t = now()) - t0 < seconds) {
			if (full_write(s, buf, size) < 0)
				die("write");
			if (full_read(s, buf, size) != 1)
				die("read");
			transactions++;
		}
	}
	close(s);
	double secs = t - t0;
	if (m == 'e')
		printf("rr transactions=%llu seconds=%.3f per_s=%.1f\n", transactions, secs, transactions / secs);
	else
		printf("%s bytes=%llu seconds=%.3f mbit_per_s=%.2f\n", mode, bytes, secs, bytes * 8 / secs / 1e6);
	return 0;
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	if (argc == 4 && strcmp(argv[1], "server") == 0)
		serve(argv[2], argv[3]); /* never returns */
	if ((argc == 6 || argc == 7) && strcmp(argv[1], "client") == 0)
		return client(argv[2], argv[3], argv[4], atof(argv[5]), argc == 7 ? (uint32_t)atoi(argv[6]) : 0);
	fprintf(stderr, "usage: netbench server ADDR PORT | netbench client ADDR PORT tx|rx|rr SECONDS [SIZE]\n");
	return 2;
}
