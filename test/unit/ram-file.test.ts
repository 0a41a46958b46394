/**
 * Guest RAM files: written sparsely, mapped back copy-on-write, checked for size.
 * Uses real host memory (mmap) but no KVM.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { GuestMemory, contiguousLayout } from "../../src/memory/guest-memory";
import { ramLayout } from "../../src/arch/x86/layout";
import * as sys from "../../src/sys/libc";
import { PAGE_SIZE, RamFileError, fileDataBytes, mapRamFile, readRamFileInto, writeRamFile } from "../../src/memory/ram-file";

const MiB = 1024 * 1024;

function withDir(fn: (dir: string) => void): void {
  const dir = fs.mkdtempSync(join(tmpdir(), "tskvm-ramfile-"));
  try {
    fn(dir);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function save(memory: GuestMemory, path: string) {
  const fd = fs.openSync(path, "wx");
  try {
    return writeRamFile(memory, fd);
  } finally {
    fs.closeSync(fd);
  }
}

function dataBytes(path: string): number {
  const fd = fs.openSync(path, "r");
  try {
    return fileDataBytes(fd);
  } finally {
    fs.closeSync(fd);
  }
}

test("only the pages that are not zero become data, and reading skips untouched pages", () => {
  withDir((dir) => {
    const memory = GuestMemory.allocate(64 * MiB);
    try {
      memory.writeU32(0x1000, 0xdeadbeef);
      memory.write(40 * MiB + 3 * PAGE_SIZE, Buffer.from("hello"));
      memory.fill(20 * MiB, 8 * PAGE_SIZE, 0); // touched, but still zero
      const stats = save(memory, join(dir, "ram"));
      assert.equal(stats.totalBytes, 64 * MiB);
      assert.equal(stats.dataBytes, 2 * PAGE_SIZE);
      assert.equal(fs.statSync(join(dir, "ram")).size, 64 * MiB);
      assert.equal(dataBytes(join(dir, "ram")), 2 * PAGE_SIZE);
      // Untouched RAM was known to be zero from the page tables (a huge page may make a
      // touched area up to 2 MiB wide).
      assert.ok(stats.pagesRead <= 3 * 512, `${stats.pagesRead} pages read of ${(64 * MiB) / PAGE_SIZE}`);
    } finally {
      memory.free();
    }
  });
});

test("a RAM file maps back with the same contents, copy-on-write", () => {
  withDir((dir) => {
    const path = join(dir, "ram");
    const memory = GuestMemory.allocate(32 * MiB);
    try {
      memory.writeU64(0x2000, 0x1122334455667788n);
      memory.writeU8(31 * MiB + 17, 0x5a);
      save(memory, path);
    } finally {
      memory.free();
    }
    const before = fs.readFileSync(path);
    const restored = mapRamFile(path, contiguousLayout(32 * MiB));
    try {
      assert.equal(restored.backing?.kind, "file-private");
      assert.equal(restored.readU64(0x2000), 0x1122334455667788n);
      assert.equal(restored.readU8(31 * MiB + 17), 0x5a);
      assert.equal(restored.readU32(16 * MiB), 0);
      restored.writeU32(0x2000, 0);
      restored.writeU32(8 * MiB, 0xcafe);
      assert.equal(restored.readU32(8 * MiB), 0xcafe);
    } finally {
      restored.free();
    }
    assert.ok(fs.readFileSync(path).equals(before), "the guest's writes reached the RAM file");
  });
});

test("a restored VM's RAM saves again: its writes, the file's data, none of the file's holes", () => {
  withDir((dir) => {
    const first = join(dir, "first");
    const memory = GuestMemory.allocate(32 * MiB);
    try {
      memory.writeU32(0x3000, 1);
      memory.writeU32(0x5000, 2);
      save(memory, first);
    } finally {
      memory.free();
    }
    const restored = mapRamFile(first, contiguousLayout(32 * MiB));
    try {
      restored.writeU32(0x5000, 0); // a data page becomes zero: a hole now
      restored.writeU32(12 * MiB, 3); // a hole page gets data
      const stats = save(restored, join(dir, "second"));
      assert.equal(stats.dataBytes, 2 * PAGE_SIZE);
      assert.ok(stats.pagesRead <= 3, `${stats.pagesRead} pages read: holes of the first file must be known zero`);
    } finally {
      restored.free();
    }
    const again = mapRamFile(join(dir, "second"), contiguousLayout(32 * MiB));
    try {
      assert.deepEqual([again.readU32(0x3000), again.readU32(0x5000), again.readU32(12 * MiB)], [1, 0, 3]);
    } finally {
      again.free();
    }
  });
});

test("RAM above the PCI hole goes after the low RAM in the file", () => {
  withDir((dir) => {
    const size = 3 * 1024 * MiB + 16 * MiB; // 3 GiB below the hole, 16 MiB from 4 GiB
    const memory = GuestMemory.allocate(ramLayout(size));
    try {
      assert.equal(memory.regions.length, 2);
      memory.writeU32(0x1_0000_0000 + 0x1000, 0xabcd);
      const stats = save(memory, join(dir, "ram"));
      assert.equal(stats.dataBytes, PAGE_SIZE);
    } finally {
      memory.free();
    }
    const fd = fs.openSync(join(dir, "ram"), "r");
    try {
      const word = Buffer.alloc(4);
      fs.readSync(fd, word, 0, 4, 3 * 1024 * MiB + 0x1000);
      assert.equal(word.readUInt32LE(0), 0xabcd);
    } finally {
      fs.closeSync(fd);
    }
  });
});

test("a RAM file of the wrong size is refused before it is mapped", () => {
  withDir((dir) => {
    const path = join(dir, "ram");
    fs.writeFileSync(path, Buffer.alloc(PAGE_SIZE));
    assert.throws(() => mapRamFile(path, contiguousLayout(16 * MiB)), (e: unknown) => e instanceof RamFileError && /holds 4096 bytes of guest RAM, not 16777216/.test(e.message));
    const memory = GuestMemory.forTest(16 * MiB);
    assert.throws(() => readRamFileInto(path, memory), RamFileError);
  });
});

test("a RAM file copies into shared RAM (for vhost-user), data only", () => {
  withDir((dir) => {
    const path = join(dir, "ram");
    const src = GuestMemory.forTest(16 * MiB);
    src.writeU32(0x1000, 7);
    src.writeU32(15 * MiB, 9);
    const stats = save(src, path);
    assert.equal(stats.pagesRead, (16 * MiB) / PAGE_SIZE, "test memory has no page tables to ask: every page is read");
    assert.equal(stats.dataBytes, 2 * PAGE_SIZE);
    const dst = GuestMemory.allocate(16 * MiB);
    try {
      assert.equal(readRamFileInto(path, dst), 2 * PAGE_SIZE);
      assert.deepEqual([dst.readU32(0x1000), dst.readU32(15 * MiB), dst.readU32(0x2000)], [7, 9, 0]);
    } finally {
      dst.free();
    }
  });
});

test("shared file memory (a vhost-user memfd) saves by its holes, whoever wrote the pages", () => {
  withDir((dir) => {
    const size = 16 * MiB;
    const backingPath = join(dir, "shared");
    fs.writeFileSync(backingPath, "");
    fs.truncateSync(backingPath, size);
    // Another process writing the shared file: here, a plain write(2), which never touches
    // our page tables.
    const other = fs.openSync(backingPath, "r+");
    fs.writeSync(other, Buffer.from([1, 2, 3]), 0, 3, 5 * MiB);
    fs.closeSync(other);
    const fd = sys.open(backingPath, sys.O_RDWR);
    const address = sys.mmap(size, sys.PROT_READ | sys.PROT_WRITE, sys.MAP_SHARED, fd, 0);
    const memory = GuestMemory.adopt(address, contiguousLayout(size), { kind: "shared-fd", fd });
    try {
      memory.writeU32(0x1000, 42);
      const stats = save(memory, join(dir, "ram"));
      assert.equal(stats.dataBytes, 2 * PAGE_SIZE);
      assert.ok(stats.pagesRead <= 2, `${stats.pagesRead} pages read: the holes of the shared file are zero`);
    } finally {
      memory.free();
    }
    const back = mapRamFile(join(dir, "ram"), contiguousLayout(size));
    try {
      assert.deepEqual([back.readU32(0x1000), back.readU8(5 * MiB + 2)], [42, 3]);
    } finally {
      back.free();
    }
  });
});
