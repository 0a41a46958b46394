/*
 * kick_loop.c - one request per kick, end to end: the C baseline for what a guest waits for
 * when it sends one virtio-blk read and sleeps until the interrupt.
 *
 * A "driver" thread plays the guest: it publishes one 4 KiB read request on a split
 * virtqueue in shared guest memory, kicks (write(2) to the kick eventfd: what KVM's
 * ioeventfd does when the guest writes the notify register), then sleeps in poll(2) on
 * the interrupt eventfd (what irqfd would inject) and reads it, and checks the used ring
 * and the status byte. One round trip per request, timed.
 *
 * The device side is either
 *   --device c      a thread of this program doing the least a device must: poll(2) on
 *                   the kick eventfd, read(2) it, read the request header, pread(2) 4 KiB
 *                   of --file into the data buffer, write the status byte and the used
 *                   ring, write(2) the interrupt eventfd. (The baseline.)
 *   --device none   nobody here: another process serves the queue (tskvm's I/O worker in
 *                   scripts/bench-kick.ts), given the same fds. The driver side is the same
 *                   code in both cases, so the difference is the device's wake-up path.
 *
 * Memory: --mem-fd N names a memfd of at least 2 MiB shared with the device (the guest
 * RAM, guest-physical address 0 at offset 0); without it the program makes its own (for
 * --device c). Layout, guest-physical: descriptor table 0x10000, available ring 0x11000,
 * used ring 0x12000 (queue size 256), request header 0x100000, data 0x101000, status
 * 0x102000. Kick and interrupt eventfds: --kick-fd / --irq-fd, or made here.
 *
 * Offsets: the same xorshift32 generator as blk_baseline.c (--seed), 4 KiB-aligned,
 * within --file's size (or --blocks N).
 *
 * Prints one JSON line: {"device": "c", "requests": N, "seconds": S, "usPerRequest": U}
 * Usage: kick_loop [--device c|none] [--file PATH] [--blocks N] [--requests N]
 *                  [--warmup K] [--seed S] [--mem-fd N] [--kick-fd N] [--irq-fd N]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define QSIZE 256
#define DESC 0x10000u
#define AVAIL 0x11000u
#define USED 0x12000u
#define HDR 0x100000u
#define DATA 0x101000u
#define STATUS 0x102000u
#define MEM_BYTES (2u << 20)

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

struct desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags, next;
};

static void die(const char *what)
{
	fprintf(stderr, "kick_loop: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint8_t *mem;
static int kick_fd, irq_fd, file_fd = -1;
static volatile int stopping;

/* ---- the device (baseline) ------------------------------------------------------- */

static void *device(void *arg)
{
	(void)arg;
	volatile uint16_t *avail = (volatile uint16_t *)(mem + AVAIL);
	volatile uint16_t *used = (volatile uint16_t *)(mem + USED);
	uint16_t next_avail = 0, used_idx = 0;
	struct pollfd p = { .fd = kick_fd, .events = POLLIN };
	uint64_t v;
	const uint64_t one = 1;
	for (;;) {
		if (poll(&p, 1, -1) < 0) {
			if (errno == EINTR) continue;
			die("device poll");
		}
		if (read(kick_fd, &v, 8) != 8 && errno != EAGAIN) die("device read kick");
		if (stopping) return NULL;
		uint16_t idx = __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE);
		while (next_avail != idx) {
			uint16_t head = avail[2 + (next_avail % QSIZE)];
			next_avail++;
			uint64_t sector;
			memcpy(&sector, mem + HDR + 8, 8);
			ssize_t n = pread(file_fd, mem + DATA, 4096, (off_t)(sector * 512));
			mem[STATUS] = n == 4096 ? 0 : 1;
			uint32_t *elem = (uint32_t *)(mem + USED + 4 + 8 * (used_idx % QSIZE));
			elem[0] = head;
			elem[1] = 4096 + 1;
			used_idx++;
		}
		__atomic_store_n(&used[1], used_idx, __ATOMIC_RELEASE);
		if (write(irq_fd, &one, 8) != 8) die("device write irq");
	}
}

/* ---- the driver (the guest's part, the same for every device) ------------------- */

static uint32_t rng_state;
static uint32_t next_block(uint32_t blocks)
{
	uint32_t x = rng_state;
	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	rng_state = x;
	return x % blocks;
}

static int parse_fd(const char *s)
{
	char *end;
	long v = strtol(s, &end, 10);
	if (*end != 0 || v < 0 || v > 65535) {
		fprintf(stderr, "kick_loop: bad fd %s\n", s);
		exit(2);
	}
	return (int)v;
}

int main(int argc, char **argv)
{
	const char *dev = "c", *file = NULL;
	long requests = 20000, warmup = 2000;
	uint32_t seed = 1, blocks = 0;
	int mem_fd = -1;
	kick_fd = irq_fd = -1;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		int has = i + 1 < argc;
		if (!strcmp(a, "--device") && has) dev = argv[++i];
		else if (!strcmp(a, "--file") && has) file = argv[++i];
		else if (!strcmp(a, "--blocks") && has) blocks = (uint32_t)strtoul(argv[++i], NULL, 0);
		else if (!strcmp(a, "--requests") && has) requests = atol(argv[++i]);
		else if (!strcmp(a, "--warmup") && has) warmup = atol(argv[++i]);
		else if (!strcmp(a, "--seed") && has) seed = (uint32_t)strtoul(argv[++i], NULL, 0);
		else if (!strcmp(a, "--mem-fd") && has) mem_fd = parse_fd(argv[++i]);
		else if (!strcmp(a, "--kick-fd") && has) kick_fd = parse_fd(argv[++i]);
		else if (!strcmp(a, "--irq-fd") && has) irq_fd = parse_fd(argv[++i]);
		else {
			fprintf(stderr, "usage: kick_loop [--device c|none] [--file PATH] [--blocks N] [--requests N] [--warmup K] [--seed S] [--mem-fd N] [--kick-fd N] [--irq-fd N]\n");
			return 2;
		}
	}
	int own_device = !strcmp(dev, "c");
	if (!own_device && strcmp(dev, "none")) {
		fprintf(stderr, "kick_loop: --device is c or none\n");
		return 2;
	}
	if (requests <= 0 || seed == 0) {
		fprintf(stderr, "kick_loop: --requests and --seed must be positive\n");
		return 2;
	}
	if (file != NULL) {
		file_fd = open(file, O_RDONLY | O_CLOEXEC);
		if (file_fd < 0) die("open --file");
		struct stat st;
		if (fstat(file_fd, &st) < 0) die("fstat");
		if (blocks == 0) blocks = (uint32_t)(st.st_size / 4096);
	}
	if (own_device && file_fd < 0) {
		fprintf(stderr, "kick_loop: --device c needs --file\n");
		return 2;
	}
	if (blocks == 0) {
		fprintf(stderr, "kick_loop: no blocks to read (--file or --blocks)\n");
		return 2;
	}
	if (mem_fd < 0) {
		mem_fd = memfd_create("kick_loop", MFD_CLOEXEC);
		if (mem_fd < 0 || ftruncate(mem_fd, MEM_BYTES) < 0) die("memfd");
	}
	mem = mmap(NULL, MEM_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
	if (mem == MAP_FAILED) die("mmap guest memory");
	if (kick_fd < 0 && (kick_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) die("eventfd");
	if (irq_fd < 0 && (irq_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) die("eventfd");

	/* One chain, built once: header (readable), data (writable), status (writable). */
	struct desc *d = (struct desc *)(mem + DESC);
	d[0] = (struct desc){ HDR, 16, VIRTQ_DESC_F_NEXT, 1 };
	d[1] = (struct desc){ DATA, 4096, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2 };
	d[2] = (struct desc){ STATUS, 1, VIRTQ_DESC_F_WRITE, 0 };
	memset(mem + HDR, 0, 16); /* type 0: VIRTIO_BLK_T_IN */
	volatile uint16_t *avail = (volatile uint16_t *)(mem + AVAIL);
	volatile uint16_t *used = (volatile uint16_t *)(mem + USED);
	uint16_t avail_idx = avail[1], seen_used = used[1];

	pthread_t thread;
	if (own_device && pthread_create(&thread, NULL, device, NULL) != 0) die("pthread_create");

	rng_state = seed;
	const uint64_t one = 1;
	struct pollfd p = { .fd = irq_fd, .events = POLLIN };
	double t0 = 0;
	for (long i = 0; i < warmup + requests; i++) {
		if (i == warmup) t0 = now();
		uint64_t sector = (uint64_t)next_block(blocks) * 8;
		memcpy(mem + HDR + 8, &sector, 8);
		mem[STATUS] = 0xff;
		avail[2 + (avail_idx % QSIZE)] = 0;
		avail_idx++;
		__atomic_store_n(&avail[1], avail_idx, __ATOMIC_RELEASE);
		if (write(kick_fd, &one, 8) != 8) die("driver kick");
		/* Sleep until the interrupt, as the guest does; then look at the used ring. */
		for (;;) {
			if (poll(&p, 1, 10000) <= 0) {
				if (errno == EINTR) continue;
				fprintf(stderr, "kick_loop: no interrupt within 10 s (request %ld)\n", i);
				return 1;
			}
			uint64_t v;
			if (read(irq_fd, &v, 8) != 8 && errno != EAGAIN) die("driver read irq");
			if (__atomic_load_n(&used[1], __ATOMIC_ACQUIRE) != seen_used) break;
		}
		seen_used++;
		if (mem[STATUS] != 0) {
			fprintf(stderr, "kick_loop: request %ld failed (status %u)\n", i, mem[STATUS]);
			return 1;
		}
	}
	double s = now() - t0;
	if (own_device) {
		stopping = 1;
		if (write(kick_fd, &one, 8) != 8) die("stop kick");
		pthread_join(thread, NULL);
	}
	printf("{\"device\": \"%s\", \"requests\": %ld, \"seconds\": %.6f, \"usPerRequest\": %.2f}\n", dev, requests, s, s * 1e6 / requests);
	return 0;
}
