/*
 * pio_exit_bench.c - C baseline for the PIO-exit round-trip benchmark.
 *
 * One VM, one 1 MiB memory slot at guest physical 0, one vCPU in real mode running a
 * two-instruction loop that does port I/O to BENCH_PORT forever. Each iteration exits
 * to user space with KVM_EXIT_IO; this program answers with the least possible work
 * (check the exit, count it, move one data byte) and calls KVM_RUN again. It reports the
 * wall time (CLOCK_MONOTONIC) of N such round trips as one JSON line on stdout:
 *
 *   {"exits": N, "seconds": S, "exitsPerSecond": R, "usPerExit": U,
 *    "mode": "out"|"in", "irqchip": false|true, "warmup": K}
 *
 * Usage: pio_exit_bench [-n N] [--warmup K] [--in] [--irqchip]
 *   -n N        timed exits (default 200000)
 *   --warmup K  untimed exits before the timed ones (default 1000)
 *   --in        guest loops on `in al, dx` instead of `out dx, al`
 *   --irqchip   create the in-kernel irqchip (KVM_CREATE_IRQCHIP) before the vCPU
 *
 * Any failing call prints one line to stderr and exits with status 1.
 * The TypeScript benchmark runs the same guest bytes, so the two numbers compare.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

/*
 * The port the guest loops on. Nothing claims it: not the in-kernel PIC (0x20, 0xa0),
 * ELCR (0x4d0-0x4d1) or PIT (0x40-0x43, 0x61, only created with KVM_CREATE_PIT2, which
 * this program never does), so every access exits to user space.
 */
#define BENCH_PORT 0x5e0

#define MEM_SIZE (1u << 20)      /* one slot, guest physical 0 .. 1 MiB */
#define CODE_GPA 0x1000u         /* where the guest code is loaded; the initial rip */
#define TSS_ADDR 0xfffbd000u     /* KVM_SET_TSS_ADDR: 3 pages just below the BIOS area */

/*
 * Guest code, 16-bit real mode, loaded at CODE_GPA with cs = 0.
 * The loop is one I/O instruction and a short jump: the interpreter on software KVM
 * costs about 1 µs per guest instruction, so keep it at two.
 */
static const uint8_t guest_out[] = {
	0xba, 0xe0, 0x05,       /* 0x1000: mov dx, 0x05e0      ; BENCH_PORT          */
	0xee,                   /* 0x1003: out dx, al          ; loop: exit (KVM_EXIT_IO, OUT) */
	0xeb, 0xfd,             /* 0x1004: jmp short 0x1003    ; rel8 -3 from 0x1006  */
};

static const uint8_t guest_in[] = {
	0xba, 0xe0, 0x05,       /* 0x1000: mov dx, 0x05e0      ; BENCH_PORT          */
	0xec,                   /* 0x1003: in al, dx           ; loop: exit (KVM_EXIT_IO, IN) */
	0xeb, 0xfd,             /* 0x1004: jmp short 0x1003    ; rel8 -3 from 0x1006  */
};

/* Print "pio_exit_bench: <what>: <strerror(errno)>" and exit 1. */
static void die(const char *what)
{
	fprintf(stderr, "pio_exit_bench: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* Print "pio_exit_bench: <message>" and exit 1. */
static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void fail(const char *fmt, ...)
{
	va_list ap;

	fputs("pio_exit_bench: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static void usage(FILE *f)
{
	fputs("usage: pio_exit_bench [-n N] [--warmup K] [--in] [--irqchip]\n", f);
}

static uint64_t parse_count(const char *opt, const char *s, uint64_t min)
{
	char *end;
	unsigned long long v;

	if (s == NULL)
		fail("%s needs a number", opt);
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || s[0] == '-' || v < min)
		fail("%s: bad count '%s' (an integer >= %" PRIu64 ")", opt, s, min);
	return v;
}

static double now_seconds(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		die("clock_gettime(CLOCK_MONOTONIC)");
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Report an exit that is not the expected PIO exit, with what KVM says about it. */
static void unexpected_exit(const struct kvm_run *run)
{
	switch (run->exit_reason) {
	case KVM_EXIT_IO:
		fail("unexpected KVM_EXIT_IO: port 0x%x, direction %u, size %u, count %u",
		     run->io.port, run->io.direction, run->io.size, run->io.count);
	case KVM_EXIT_INTERNAL_ERROR:
		fail("KVM_EXIT_INTERNAL_ERROR, suberror %u (1 = emulation failure)",
		     run->internal.suberror);
	case KVM_EXIT_FAIL_ENTRY:
		fail("KVM_EXIT_FAIL_ENTRY, hardware reason 0x%llx",
		     (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
	case KVM_EXIT_SHUTDOWN:
		fail("KVM_EXIT_SHUTDOWN (guest triple fault)");
	default:
		fail("unexpected exit reason %u", run->exit_reason);
	}
}

/*
 * Run the vCPU until it has taken `n` PIO exits, handling each one: check it is a
 * one-byte access to BENCH_PORT in the expected direction; for IN, supply a byte (the
 * low byte of the count); for OUT, read the guest's byte into *sum.
 */
static void run_exits(int vcpu, struct kvm_run *run, uint64_t n, int in_mode, uint64_t *sum)
{
	const uint8_t dir = in_mode ? KVM_EXIT_IO_IN : KVM_EXIT_IO_OUT;
	uint64_t done = 0;

	while (done < n) {
		if (ioctl(vcpu, KVM_RUN, 0) != 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN");
		}
		if (run->exit_reason != KVM_EXIT_IO || run->io.port != BENCH_PORT ||
		    run->io.direction != dir || run->io.size != 1 || run->io.count != 1)
			unexpected_exit(run);
		uint8_t *data = (uint8_t *)run + run->io.data_offset;
		if (in_mode)
			*data = (uint8_t)done;
		else
			*sum += *data;
		done++;
	}
}

int main(int argc, char **argv)
{
	uint64_t n = 200000, warmup = 1000, sum = 0;
	int in_mode = 0, irqchip = 0;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (strcmp(a, "-n") == 0)
			n = parse_count("-n", argv[++i], 1);
		else if (strcmp(a, "--warmup") == 0)
			warmup = parse_count("--warmup", argv[++i], 0);
		else if (strcmp(a, "--in") == 0)
			in_mode = 1;
		else if (strcmp(a, "--irqchip") == 0)
			irqchip = 1;
		else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
			usage(stdout);
			return 0;
		} else {
			usage(stderr);
			fail("unknown argument '%s'", a);
		}
	}

	/* System and VM. */
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	int api = ioctl(kvm, KVM_GET_API_VERSION, 0);
	if (api < 0)
		die("KVM_GET_API_VERSION");
	if (api != KVM_API_VERSION)
		fail("KVM API version %d, expected %d", api, KVM_API_VERSION);

	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	if (ioctl(vm, KVM_SET_TSS_ADDR, (unsigned long)TSS_ADDR) != 0)
		die("KVM_SET_TSS_ADDR");
	if (irqchip && ioctl(vm, KVM_CREATE_IRQCHIP, 0) != 0)
		die("KVM_CREATE_IRQCHIP");

	/* Guest memory: one anonymous 1 MiB slot at guest physical 0, code at CODE_GPA. */
	uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap guest memory");
	if (in_mode)
		memcpy(mem + CODE_GPA, guest_in, sizeof(guest_in));
	else
		memcpy(mem + CODE_GPA, guest_out, sizeof(guest_out));

	struct kvm_userspace_memory_region region = {
		.slot = 0,
		.flags = 0,
		.guest_phys_addr = 0,
		.memory_size = MEM_SIZE,
		.userspace_addr = (uint64_t)(uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) != 0)
		die("KVM_SET_USER_MEMORY_REGION");

	/* vCPU and its shared kvm_run page. */
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size < 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	if ((size_t)run_size < sizeof(struct kvm_run))
		fail("KVM_GET_VCPU_MMAP_SIZE is %d, less than sizeof(struct kvm_run) %zu",
		     run_size, sizeof(struct kvm_run));
	struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");

	/* Real mode at 0000:1000. The reset state is real mode already; only cs moves. */
	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) != 0)
		die("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) != 0)
		die("KVM_SET_SREGS");

	struct kvm_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rflags = 0x2;          /* bit 1 is reserved and must be set; IF clear */
	if (ioctl(vcpu, KVM_SET_REGS, &regs) != 0)
		die("KVM_SET_REGS");

	/* Warm-up (the first exits fault in memory and the interpreter's caches), then time. */
	run_exits(vcpu, run, warmup, in_mode, &sum);
	double t0 = now_seconds();
	run_exits(vcpu, run, n, in_mode, &sum);
	double seconds = now_seconds() - t0;

	printf("{\"exits\": %" PRIu64 ", \"seconds\": %.6f, \"exitsPerSecond\": %.0f, "
	       "\"usPerExit\": %.3f, \"mode\": \"%s\", \"irqchip\": %s, \"warmup\": %" PRIu64 "}\n",
	       n, seconds, (double)n / seconds, seconds * 1e6 / (double)n,
	       in_mode ? "in" : "out", irqchip ? "true" : "false", warmup);
	if (fflush(stdout) != 0)
		die("write stdout");

	munmap(run, (size_t)run_size);
	munmap(mem, MEM_SIZE);
	close(vcpu);
	close(vm);
	close(kvm);
	return 0;
}
