/*
 * seccomp_deny.c - run a command with some system calls failing, as a container's seccomp
 * profile would make them fail: for tests of what tskvm does when io_uring is blocked.
 *
 *   seccomp_deny ERRNO NR[,NR...] -- COMMAND [ARG...]
 *
 * Installs a seccomp filter (after PR_SET_NO_NEW_PRIVS) under which each listed x86-64
 * system call number returns -ERRNO (e.g. 1 for EPERM, 38 for ENOSYS) and every other
 * call is allowed, then execs COMMAND. The filter is inherited by all its threads and
 * children. Exits 125 on bad arguments or a failure before the exec.
 */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#define MAX_DENIED 16

int main(int argc, char **argv)
{
	if (argc < 5 || strcmp(argv[3], "--") != 0) {
		fprintf(stderr, "usage: seccomp_deny ERRNO NR[,NR...] -- COMMAND [ARG...]\n");
		return 125;
	}
	int err = atoi(argv[1]);
	int nrs[MAX_DENIED], n = 0;
	for (char *s = strtok(argv[2], ","); s != NULL && n < MAX_DENIED; s = strtok(NULL, ",")) nrs[n++] = atoi(s);
	if (err <= 0 || err > 4095 || n == 0) {
		fprintf(stderr, "seccomp_deny: bad ERRNO or system call list\n");
		return 125;
	}
	/* arch check, load nr, then one compare per denied call, then allow. */
	struct sock_filter f[4 + 2 * MAX_DENIED + 1];
	int k = 0;
	f[k++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
	f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0);
	f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
	f[k++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
	for (int i = 0; i < n; i++) {
		f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nrs[i], 0, 1);
		f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (unsigned)err);
	}
	f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
	struct sock_fprog prog = { .len = (unsigned short)k, .filter = f };
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
		fprintf(stderr, "seccomp_deny: installing the filter: %s\n", strerror(errno));
		return 125;
	}
	execvp(argv[4], argv + 4);
	fprintf(stderr, "seccomp_deny: %s: %s\n", argv[4], strerror(errno));
	return 125;
}
