/*
 * io_uring_abi.c - print the io_uring ABI as the host's <linux/io_uring.h> defines it.
 *
 * test/unit/io-uring.test.ts compiles this file (via scripts/lib/native.ts), runs it and
 * compares every line with what src/sys/io-uring.ts exports. Output: "name value" per
 * line, value in decimal. Names:
 *
 *   IoUringAbi.X    a struct size or field offset (byte offsets; SQ_OFF_* / CQ_OFF_* are
 *                   u32 indices into struct io_sqring_offsets / io_cqring_offsets)
 *   IoUringOp.X     IORING_OP_X
 *   X               the macro X (IOSQE_*, IORING_*)
 */
#include <stddef.h>
#include <stdio.h>
#include <linux/fs.h>
#include <linux/io_uring.h>

#define P(name, value) printf("%s %llu\n", name, (unsigned long long)(value))
#define OP(x) P("IoUringOp." #x, IORING_OP_##x)
#define M(x) P(#x, x)
#define OFF(name, type, field) P("IoUringAbi." name, offsetof(struct type, field))

int main(void)
{
	P("IoUringAbi.PARAMS_SIZE", sizeof(struct io_uring_params));
	OFF("PARAMS_SQ_ENTRIES", io_uring_params, sq_entries);
	OFF("PARAMS_CQ_ENTRIES", io_uring_params, cq_entries);
	OFF("PARAMS_FLAGS", io_uring_params, flags);
	OFF("PARAMS_FEATURES", io_uring_params, features);
	OFF("PARAMS_SQ_OFF", io_uring_params, sq_off);
	OFF("PARAMS_CQ_OFF", io_uring_params, cq_off);
	P("IoUringAbi.SQ_OFF_HEAD", offsetof(struct io_sqring_offsets, head) / 4);
	P("IoUringAbi.SQ_OFF_TAIL", offsetof(struct io_sqring_offsets, tail) / 4);
	P("IoUringAbi.SQ_OFF_RING_MASK", offsetof(struct io_sqring_offsets, ring_mask) / 4);
	P("IoUringAbi.SQ_OFF_RING_ENTRIES", offsetof(struct io_sqring_offsets, ring_entries) / 4);
	P("IoUringAbi.SQ_OFF_FLAGS", offsetof(struct io_sqring_offsets, flags) / 4);
	P("IoUringAbi.SQ_OFF_DROPPED", offsetof(struct io_sqring_offsets, dropped) / 4);
	P("IoUringAbi.SQ_OFF_ARRAY", offsetof(struct io_sqring_offsets, array) / 4);
	P("IoUringAbi.CQ_OFF_HEAD", offsetof(struct io_cqring_offsets, head) / 4);
	P("IoUringAbi.CQ_OFF_TAIL", offsetof(struct io_cqring_offsets, tail) / 4);
	P("IoUringAbi.CQ_OFF_RING_MASK", offsetof(struct io_cqring_offsets, ring_mask) / 4);
	P("IoUringAbi.CQ_OFF_RING_ENTRIES", offsetof(struct io_cqring_offsets, ring_entries) / 4);
	P("IoUringAbi.CQ_OFF_OVERFLOW", offsetof(struct io_cqring_offsets, overflow) / 4);
	P("IoUringAbi.CQ_OFF_CQES", offsetof(struct io_cqring_offsets, cqes) / 4);
	P("IoUringAbi.SQE_SIZE", sizeof(struct io_uring_sqe));
	P("IoUringAbi.CQE_SIZE", sizeof(struct io_uring_cqe));
	OFF("SQE_OPCODE", io_uring_sqe, opcode);
	OFF("SQE_FLAGS", io_uring_sqe, flags);
	OFF("SQE_IOPRIO", io_uring_sqe, ioprio);
	OFF("SQE_FD", io_uring_sqe, fd);
	OFF("SQE_OFF", io_uring_sqe, off);
	OFF("SQE_ADDR", io_uring_sqe, addr);
	OFF("SQE_LEN", io_uring_sqe, len);
	OFF("SQE_OP_FLAGS", io_uring_sqe, rw_flags);
	OFF("SQE_USER_DATA", io_uring_sqe, user_data);
	OFF("SQE_BUF_INDEX", io_uring_sqe, buf_index);
	OFF("SQE_PERSONALITY", io_uring_sqe, personality);
	OFF("SQE_FILE_INDEX", io_uring_sqe, file_index);
	OFF("SQE_ADDR3", io_uring_sqe, addr3);
	OFF("CQE_USER_DATA", io_uring_cqe, user_data);
	OFF("CQE_RES", io_uring_cqe, res);
	OFF("CQE_FLAGS", io_uring_cqe, flags);
	P("IoUringAbi.PROBE_HEADER_SIZE", sizeof(struct io_uring_probe));
	P("IoUringAbi.PROBE_OP_SIZE", sizeof(struct io_uring_probe_op));
	OP(NOP);
	OP(READV);
	OP(WRITEV);
	OP(FSYNC);
	OP(POLL_ADD);
	OP(FALLOCATE);
	OP(READ);
	OP(WRITE);
	M(IOSQE_IO_DRAIN);
	M(IOSQE_IO_LINK);
	M(IOSQE_IO_HARDLINK);
	M(IOSQE_ASYNC);
	M(IORING_FSYNC_DATASYNC);
	M(RWF_NOWAIT);
	M(IORING_POLL_ADD_MULTI);
	M(IORING_CQE_F_MORE);
	M(IORING_SETUP_CLAMP);
	M(IORING_SETUP_SUBMIT_ALL);
	M(IORING_SETUP_COOP_TASKRUN);
	M(IORING_SETUP_SINGLE_ISSUER);
	M(IORING_SETUP_DEFER_TASKRUN);
	M(IORING_ENTER_GETEVENTS);
	M(IORING_FEAT_SINGLE_MMAP);
	M(IORING_FEAT_NODROP);
	M(IORING_FEAT_SUBMIT_STABLE);
	return 0;
}
