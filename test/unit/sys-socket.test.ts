import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readlinkSync } from "node:fs";
import * as sys from "../../src/sys/libc";
import { MAX_FDS_PER_MESSAGE, recvmsg, sendmsg, unixAddress } from "../../src/sys/socket";
import { F_SEAL_GROW, F_SEAL_SHRINK, MFD_ALLOW_SEALING, addSeals, ftruncate, getSeals, memfdCreate } from "../../src/sys/memfd";

const u64 = (n: bigint) => new Uint8Array(new BigUint64Array([n]).buffer);

describe("sendmsg/recvmsg with SCM_RIGHTS", () => {
  it("passes a working descriptor along with the bytes", () => {
    const [a, b] = sys.socketpair(sys.AF_UNIX, sys.SOCK_STREAM);
    const efd = sys.eventfd();
    assert.equal(sendmsg(a, Uint8Array.from([1, 2, 3]), [efd]), 3);
    const into = new Uint8Array(16);
    const r = recvmsg(b, into)!;
    assert.equal(r.bytes, 3);
    assert.deepEqual([...into.subarray(0, 3)], [1, 2, 3]);
    assert.equal(r.fds.length, 1);
    const got = r.fds[0]!;
    assert.notEqual(got, efd);
    assert.match(readlinkSync(`/proc/self/fd/${got}`), /eventfd/);
    // The same eventfd: a write on ours is read on the received one.
    sys.write(efd, u64(5n));
    const v = new Uint8Array(8);
    sys.read(got, v);
    assert.equal(new BigUint64Array(v.buffer)[0], 5n);
    for (const fd of [a, b, efd, got]) sys.close(fd);
  });

  it("reads into the middle of a buffer, and reports EOF and an empty non-blocking socket", () => {
    const [a, b] = sys.socketpair(sys.AF_UNIX, sys.SOCK_STREAM | sys.SOCK_NONBLOCK);
    assert.equal(recvmsg(b, new Uint8Array(4)), null);
    sendmsg(a, Uint8Array.from([9, 8]));
    const into = new Uint8Array(6);
    assert.equal(recvmsg(b, into.subarray(4))!.bytes, 2);
    assert.deepEqual([...into], [0, 0, 0, 0, 9, 8]);
    sys.close(a);
    assert.deepEqual(recvmsg(b, into), { bytes: 0, fds: [] });
    sys.close(b);
  });

  it(`refuses to send more than ${MAX_FDS_PER_MESSAGE} descriptors at once`, () => {
    const [a, b] = sys.socketpair(sys.AF_UNIX, sys.SOCK_STREAM);
    const many = Array.from({ length: MAX_FDS_PER_MESSAGE + 1 }, () => sys.eventfd());
    assert.throws(() => sendmsg(a, Uint8Array.from([1]), many), RangeError);
    for (const fd of [a, b, ...many]) sys.close(fd);
  });

  it("closes the descriptors of a message that carried too many, and says so", () => {
    // Another process sends 20 descriptors in one message (python3, as a hostile peer would).
    const [ours, theirs] = sys.socketpair(sys.AF_UNIX, sys.SOCK_DGRAM);
    const script = "import os,socket; s=socket.socket(fileno=3); socket.send_fds(s, [b'x'], [os.eventfd(0) for _ in range(20)])";
    const r = spawnSync("python3", ["-c", script], { stdio: ["ignore", "inherit", "inherit", theirs] });
    assert.equal(r.status, 0);
    const before = countFds();
    assert.throws(() => recvmsg(ours, new Uint8Array(4)), /more than 16 descriptors\) failed: EMSGSIZE/);
    assert.equal(countFds(), before, "every descriptor that arrived was closed");
    for (const fd of [ours, theirs]) sys.close(fd);
  });

  it("lays out sockaddr_un and refuses paths that do not fit", () => {
    const addr = unixAddress("/run/x.sock");
    assert.equal(addr.byteLength, 2 + 11 + 1);
    assert.deepEqual([...addr.subarray(0, 2)], [1, 0]);
    assert.throws(() => unixAddress("/".repeat(108)), RangeError);
    assert.throws(() => unixAddress(""), RangeError);
  });
});

describe("memfd", () => {
  it("makes sealable anonymous memory of a size", () => {
    const fd = memfdCreate("test", MFD_ALLOW_SEALING);
    ftruncate(fd, 65536);
    addSeals(fd, F_SEAL_SHRINK | F_SEAL_GROW);
    assert.equal(getSeals(fd) & (F_SEAL_SHRINK | F_SEAL_GROW), F_SEAL_SHRINK | F_SEAL_GROW);
    assert.throws(() => ftruncate(fd, 4096), /EPERM/);
    assert.match(readlinkSync(`/proc/self/fd/${fd}`), /memfd:test/);
    sys.close(fd);
  });
});

function countFds(): number {
  return require("node:fs").readdirSync("/proc/self/fd").length;
}
