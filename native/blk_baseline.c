/*
 * blk_baseline.c - C baselines for the virtio-blk benchmark: the same system calls the
 * device makes, on the same image file, with the same sizes and offsets, and nothing else.
 *
 *   pread     one pread(2) of 4 KiB per request at pseudo-random 4 KiB-aligned offsets
 *             (what the device did per request before io_uring)
 *   pwritev   one pwritev(2) of 256 scattered 4 KiB pages (every other page of a buffer,
 *             so no two are contiguous) per 1 MiB request, at sequential 1 MiB offsets
 *   uring     4 KiB random reads through io_uring (raw io_uring_setup/io_uring_enter, no
 *             liburing): --batch reads prepared, then one io_uring_enter that submits them
 *             and waits for all their completions (what the device's io_uring engine does
 *             per queue drain)
 *
 * Offsets come from the same xorshift32 generator as scripts/bench-blk.ts (seeded by
 * --seed, restarted when the timed requests begin), so both sides read the same blocks
 * of the same file. After --warmup untimed
 * requests it times --ops requests with CLOCK_MONOTONIC and prints one JSON line:
 *
 *   {"mode": "pread", "ops": N, "seconds": S, "nsPerOp": T, "opsPerSecond": R}
 *
 * Usage: blk_baseline --file PATH --mode pread|pwritev|uring [--ops N] [--warmup K]
 *                     [--batch B] [--seed S]
 * Any failing call prints one line to stderr and exits with status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <linux/io_uring.h>

#define KiB 1024u
#define MiB (1024u * KiB)
#define PAGES 256 /* 4 KiB pages in one scattered 1 MiB write */

static void die(const char *what)
{
	fprintf(stderr, "blk_baseline: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* xorshift32, as in scripts/bench-blk.ts: the k-th 4 KiB block to read. */
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

/* ---- io_uring, raw ---------------------------------------------------------------- */

struct ring {
	int fd;
	unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
	unsigned *cq_head, *cq_tail, *cq_mask;
	struct io_uring_sqe *sqes;
	struct io_uring_cqe *cqes;
};

static void ring_init(struct ring *r, unsigned entries)
{
	struct io_uring_params p;
	memset(&p, 0, sizeof p);
	r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
	if (r->fd < 0) die("io_uring_setup");
	size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
	size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	if (!(p.features & IORING_FEAT_SINGLE_MMAP)) {
		fprintf(stderr, "blk_baseline: io_uring without IORING_FEAT_SINGLE_MMAP\n");
		exit(1);
	}
	size_t len = sq_len > cq_len ? sq_len : cq_len;
	char *sq = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
	if (sq == MAP_FAILED) die("mmap SQ ring");
	r->sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
	if (r->sqes == MAP_FAILED) die("mmap SQEs");
	r->sq_head = (unsigned *)(sq + p.sq_off.head);
	r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
	r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
	r->sq_array = (unsigned *)(sq + p.sq_off.array);
	r->cq_head = (unsigned *)(sq + p.cq_off.head);
	r->cq_tail = (unsigned *)(sq + p.cq_off.tail);
	r->cq_mask = (unsigned *)(sq + p.cq_off.ring_mask);
	r->cqes = (struct io_uring_cqe *)(sq + p.cq_off.cqes);
}

/* ---- the three loops ------------------------------------------------------------- */

int main(int argc, char **argv)
{
	const char *file = NULL, *mode = "pread";
	long ops = 200000, warmup = 20000, batch = 64;
	uint32_t seed = 1;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!strcmp(a, "--file") && v) file = argv[++i];
		else if (!strcmp(a, "--mode") && v) mode = argv[++i];
		else if (!strcmp(a, "--ops") && v) ops = atol(argv[++i]);
		else if (!strcmp(a, "--warmup") && v) warmup = atol(argv[++i]);
		else if (!strcmp(a, "--batch") && v) batch = atol(argv[++i]);
		else if (!strcmp(a, "--seed") && v) seed = (uint32_t)strtoul(argv[++i], NULL, 0);
		else {
			fprintf(stderr, "usage: blk_baseline --file PATH --mode pread|pwritev|uring [--ops N] [--warmup K] [--batch B] [--seed S]\n");
			return 2;
		}
	}
	if (file == NULL || ops <= 0 || batch <= 0 || batch > 4096 || seed == 0) {
		fprintf(stderr, "blk_baseline: --file is required; --ops, --batch (1..4096) and --seed must be positive\n");
		return 2;
	}
	int fd = open(file, O_RDWR | O_CLOEXEC);
	if (fd < 0) die("open");
	struct stat st;
	if (fstat(fd, &st) < 0) die("fstat");
	uint32_t blocks = (uint32_t)(st.st_size / (4 * KiB));
	if (blocks == 0) {
		fprintf(stderr, "blk_baseline: %s is smaller than 4 KiB\n", file);
		return 1;
	}
	rng_state = seed;
	double t0 = 0, t1 = 0;

	if (!strcmp(mode, "pread")) {
		/* One buffer per request slot, like the device's 64 chains. */
		char *buf = aligned_alloc(4096, 64 * 4 * KiB);
		for (long i = 0; i < warmup + ops; i++) {
			if (i == warmup) {
				t0 = now();
				rng_state = seed; /* the timed reads are the offsets the TypeScript side reads */
			}
			off_t off = (off_t)next_block(blocks) * 4 * KiB;
			if (pread(fd, buf + (i & 63) * 4 * KiB, 4 * KiB, off) != 4 * KiB) die("pread");
		}
		t1 = now();
	} else if (!strcmp(mode, "pwritev")) {
		char *buf = aligned_alloc(4096, 2 * PAGES * 4 * KiB);
		memset(buf, 0x5a, 2 * PAGES * 4 * KiB);
		struct iovec iov[PAGES];
		for (int p = 0; p < PAGES; p++) {
			iov[p].iov_base = buf + 2 * p * 4 * KiB;
			iov[p].iov_len = 4 * KiB;
		}
		long writes = st.st_size / MiB;
		for (long i = 0; i < warmup + ops; i++) {
			if (i == warmup) t0 = now();
			off_t off = (off_t)(i % writes) * MiB;
			if (pwritev(fd, iov, PAGES, off) != (ssize_t)MiB) die("pwritev");
		}
		t1 = now();
	} else if (!strcmp(mode, "uring")) {
		struct ring r;
		unsigned entries = 1;
		while (entries < (unsigned)batch) entries <<= 1;
		ring_init(&r, entries);
		char *buf = aligned_alloc(4096, (size_t)batch * 4 * KiB);
		long done = 0;
		for (long i = 0; i < warmup + ops; i += batch) {
			if (i >= warmup && t0 == 0) {
				t0 = now();
				rng_state = seed;
			}
			unsigned tail = *r.sq_tail;
			for (long k = 0; k < batch; k++) {
				unsigned idx = (tail + k) & *r.sq_mask;
				struct io_uring_sqe *sqe = &r.sqes[idx];
				memset(sqe, 0, sizeof *sqe);
				sqe->opcode = IORING_OP_READ;
				sqe->fd = fd;
				sqe->addr = (uint64_t)(uintptr_t)(buf + k * 4 * KiB);
				sqe->len = 4 * KiB;
				sqe->off = (uint64_t)next_block(blocks) * 4 * KiB;
				sqe->user_data = (uint64_t)k;
				r.sq_array[idx] = idx;
			}
			__atomic_store_n(r.sq_tail, tail + (unsigned)batch, __ATOMIC_RELEASE);
			int n = (int)syscall(__NR_io_uring_enter, r.fd, (unsigned)batch, (unsigned)batch, IORING_ENTER_GETEVENTS, NULL, 0);
			if (n != batch) die("io_uring_enter");
			unsigned head = *r.cq_head;
			unsigned ctail = __atomic_load_n(r.cq_tail, __ATOMIC_ACQUIRE);
			for (; head != ctail; head++) {
				struct io_uring_cqe *c = &r.cqes[head & *r.cq_mask];
				if (c->res != (int)(4 * KiB)) {
					errno = c->res < 0 ? -c->res : EIO;
					die("io_uring read");
				}
				if (i >= warmup) done++;
			}
			__atomic_store_n(r.cq_head, head, __ATOMIC_RELEASE);
		}
		t1 = now();
		ops = done;
	} else {
		fprintf(stderr, "blk_baseline: unknown --mode %s (pread, pwritev or uring)\n", mode);
		return 2;
	}
	double s = t1 - t0;
	printf("{\"mode\": \"%s\", \"ops\": %ld, \"seconds\": %.6f, \"nsPerOp\": %.1f, \"opsPerSecond\": %.0f}\n",
	       mode, ops, s, s * 1e9 / ops, ops / s);
	return 0;
}
