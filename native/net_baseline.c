/*
 * net_baseline.c - C baselines for the virtio-net benchmark: frames through a TAP with one
 * system call per frame, the calls virtio-net made per frame before io_uring.
 *
 *   rx   queue --frames copies of the frame on the TAP through a packet socket bound to it
 *        (untimed, as in scripts/bench-net.ts), then time read(2) of each from the TAP into
 *        one buffer
 *   tx   time write(2) of --frames copies of the frame (virtio-net header included)
 *
 * The TAP (opened O_NONBLOCK with IFF_VNET_HDR, 12-byte header) and, for rx, an AF_PACKET
 * socket bound to it are inherited from the benchmark as --tap-fd and --sock-fd: the
 * benchmark made them inside its network namespace. The frame is read from --frame-file:
 * for rx, the Ethernet frame the socket sends; for tx, the bytes written (header + frame).
 *
 * Prints one JSON line: {"mode": "rx", "frames": N, "seconds": S, "nsPerFrame": T}
 * Usage: net_baseline --mode rx|tx --tap-fd N [--sock-fd N] --frame-file PATH [--frames N]
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
	fprintf(stderr, "net_baseline: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	const char *mode = NULL, *frame_file = NULL;
	int tap = -1, sock = -1;
	long frames = 2048;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		int has = i + 1 < argc;
		if (!strcmp(a, "--mode") && has) mode = argv[++i];
		else if (!strcmp(a, "--tap-fd") && has) tap = atoi(argv[++i]);
		else if (!strcmp(a, "--sock-fd") && has) sock = atoi(argv[++i]);
		else if (!strcmp(a, "--frame-file") && has) frame_file = argv[++i];
		else if (!strcmp(a, "--frames") && has) frames = atol(argv[++i]);
		else {
			fprintf(stderr, "usage: net_baseline --mode rx|tx --tap-fd N [--sock-fd N] --frame-file PATH [--frames N]\n");
			return 2;
		}
	}
	if (mode == NULL || tap < 0 || frame_file == NULL || frames <= 0 || (!strcmp(mode, "rx") && sock < 0)) {
		fprintf(stderr, "net_baseline: --mode, --tap-fd, --frame-file (and for rx --sock-fd) are required\n");
		return 2;
	}
	static uint8_t frame[70 * 1024], buf[70 * 1024];
	int ffd = open(frame_file, O_RDONLY | O_CLOEXEC);
	if (ffd < 0) die("open --frame-file");
	ssize_t flen = read(ffd, frame, sizeof frame);
	if (flen <= 0) die("read --frame-file");
	close(ffd);

	double t0, t1;
	long done = 0;
	if (!strcmp(mode, "rx")) {
		long queued = 0;
		for (; queued < frames; queued++)
			if (write(sock, frame, (size_t)flen) < 0) break;
		if (queued == 0) die("queueing frames on the TAP");
		t0 = now();
		while (done < queued) {
			ssize_t n = read(tap, buf, sizeof buf);
			if (n > 0) done++;
			else if (n < 0 && errno != EAGAIN) die("read TAP");
		}
		t1 = now();
	} else if (!strcmp(mode, "tx")) {
		t0 = now();
		while (done < frames) {
			ssize_t n = write(tap, frame, (size_t)flen);
			if (n > 0) done++;
			else if (n < 0 && errno != EAGAIN) die("write TAP");
		}
		t1 = now();
	} else {
		fprintf(stderr, "net_baseline: --mode is rx or tx\n");
		return 2;
	}
	double s = t1 - t0;
	printf("{\"mode\": \"%s\", \"frames\": %ld, \"seconds\": %.6f, \"nsPerFrame\": %.1f}\n", mode, done, s, s * 1e9 / done);
	return 0;
}
