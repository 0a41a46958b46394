/**
 * Tier 3: the disks users bring, and entropy, in the default guest. One `tskvm run` boots
 * with six images the host made with the usual tools (ext2, ext3, ext4 from e2fsprogs;
 * vfat from dosfstools; ISO 9660 from genisoimage or xorriso; squashfs from
 * squashfs-tools) and mounts each: the read-write ones are written to, the read-only ones
 * (ISO 9660, squashfs: attached readonly) are read. The same guest reads /dev/hwrng,
 * which virtio-rng feeds from the host. A second run with --no-rng has no hardware RNG.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runCliAsync } from "../helpers/cli";
import { guestSkip, scaled, whereItRuns } from "../helpers/tiers";

const { skip } = guestSkip();
const READY_MS = scaled(60_000);
const dir = mkdtempSync(join(tmpdir(), "tskvm-disks-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));

const has = (tool: string, args: string[] = ["--help"]): boolean => {
  const r = spawnSync(tool, args, { stdio: "ignore" });
  return r.error === undefined;
};

function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  assert.equal(r.status, 0, `${cmd} ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
}

/** The tools that make each image; which are missing on this host. */
function missingTools(): string[] {
  const missing: string[] = [];
  if (!has("mke2fs", ["-V"])) missing.push("mke2fs (e2fsprogs)");
  if (!has("mkfs.vfat")) missing.push("mkfs.vfat (dosfstools)");
  if (!has("genisoimage", ["-version"]) && !has("xorriso", ["-version"])) missing.push("genisoimage or xorriso");
  if (!has("mksquashfs", ["-version"])) missing.push("mksquashfs (squashfs-tools)");
  return missing;
}

interface Image {
  fs: string;
  path: string;
  readOnly: boolean;
}

/** One image of each file system, each holding hello.txt with its own name in it (vfat: empty). */
function makeImages(): Image[] {
  const content = (fs: string) => {
    const d = join(dir, `content-${fs}`);
    mkdirSync(join(d, "sub"), { recursive: true });
    writeFileSync(join(d, "hello.txt"), `hello from ${fs}\n`);
    writeFileSync(join(d, "sub", "deep.txt"), `deep in ${fs}\n`);
    return d;
  };
  const images: Image[] = [];
  for (const fs of ["ext2", "ext3", "ext4"]) {
    const path = join(dir, `${fs}.img`);
    sh("mke2fs", ["-q", "-F", "-t", fs, "-d", content(fs), path, "8M"]);
    images.push({ fs, path, readOnly: false });
  }
  const vfat = join(dir, "vfat.img");
  sh("mkfs.vfat", ["-C", vfat, String(8 * 1024)]);
  images.push({ fs: "vfat", path: vfat, readOnly: false });
  const iso = join(dir, "iso9660.img");
  if (has("genisoimage", ["-version"])) sh("genisoimage", ["-quiet", "-R", "-J", "-V", "TSKVM", "-o", iso, content("iso9660")]);
  else sh("xorriso", ["-as", "mkisofs", "-quiet", "-R", "-J", "-V", "TSKVM", "-o", iso, content("iso9660")]);
  images.push({ fs: "iso9660", path: iso, readOnly: true });
  const sq = join(dir, "squashfs.img");
  sh("mksquashfs", [content("squashfs"), sq, "-noappend", "-quiet"]);
  images.push({ fs: "squashfs", path: sq, readOnly: true });
  return images;
}

/** The guest's script: mount each disk as its type, show what it holds, write where it may. */
function guestScript(images: Image[]): string {
  const lines = images.map((img, i) => {
    const dev = `/dev/vd${String.fromCharCode(0x61 + i)}`;
    const mnt = `/mnt/${img.fs}`;
    const read = img.fs === "vfat" ? `echo "hello from vfat" > ${mnt}/hello.txt && umount ${mnt} && mount -t vfat ${dev} ${mnt} && cat ${mnt}/hello.txt` : `cat ${mnt}/hello.txt ${mnt}/sub/deep.txt`;
    const write = img.readOnly ? `! touch ${mnt}/new 2>/dev/null && echo "${img.fs} refuses writes"` : `echo written > ${mnt}/new && echo "${img.fs} takes writes"`;
    return `mkdir -p ${mnt} && mount -t ${img.fs}${img.readOnly ? " -o ro" : ""} ${dev} ${mnt} && ${read} && ${write} && umount ${mnt} && echo "${img.fs} ok" || echo "${img.fs} FAILED"`;
  });
  return lines.join("; ");
}

const RNG_SCRIPT =
  "echo rng_current=$(cat /sys/class/misc/hw_random/rng_current); " +
  "a=$(head -c 64 /dev/hwrng | od -An -tx1 | tr -d ' \\n'); b=$(head -c 64 /dev/hwrng | od -An -tx1 | tr -d ' \\n'); " +
  "echo hwrng=$a; echo hwrng=$b";

test("the default guest mounts ext2, ext3, ext4, vfat, iso9660 and squashfs images, and reads /dev/hwrng", { skip, timeout: 900_000 }, async (t) => {
  t.diagnostic(`tier: Linux on ${whereItRuns()}`);
  const missing = missingTools();
  if (missing.length > 0) {
    // CI installs them (.ci/run): there a missing tool is a failure, not a skip.
    if (process.env.TSKVM_REQUIRE_GUEST === "1") assert.fail(`missing ${missing.join(", ")}`);
    return t.skip(`missing ${missing.join(", ")}`);
  }
  const images = makeImages();
  const disks = images.flatMap((img) => ["-d", img.readOnly ? `${img.path},readonly` : img.path]);
  const r = await runCliAsync(["run", "--ready-timeout", String(READY_MS / 1000), ...disks, "--", `${guestScript(images)}; ${RNG_SCRIPT}`], { timeoutMs: READY_MS + 300_000 });
  t.diagnostic(`tskvm run with ${images.length} disks: ${r.ms} ms`);
  assert.equal(r.status, 0, r.stderr);
  for (const img of images) {
    assert.match(r.stdout, new RegExp(`^hello from ${img.fs}$`, "m"), `${img.fs}: the file the host put there\n${r.stdout}`);
    if (img.fs !== "vfat") assert.match(r.stdout, new RegExp(`^deep in ${img.fs}$`, "m"), img.fs);
    assert.match(r.stdout, new RegExp(`^${img.fs} ${img.readOnly ? "refuses writes" : "takes writes"}$`, "m"), img.fs);
    assert.match(r.stdout, new RegExp(`^${img.fs} ok$`, "m"), `${img.fs} mounted and unmounted\n${r.stdout}`);
  }
  // What the guest wrote is in the images (e2fsprogs reads them back on the host).
  for (const fs of ["ext2", "ext3", "ext4"]) {
    assert.equal(sh("debugfs", ["-R", "cat /new", join(dir, `${fs}.img`)]).trim(), "written", fs);
  }
  assert.match(r.stdout, /^rng_current=virtio_rng\.\d+$/m, r.stdout);
  const samples = [...r.stdout.matchAll(/^hwrng=([0-9a-f]*)$/gm)].map((m) => m[1]!);
  assert.equal(samples.length, 2, r.stdout);
  for (const s of samples) {
    assert.equal(s.length, 128, "64 bytes from /dev/hwrng");
    assert.ok(new Set(s.match(/../g)).size > 16, `not random: ${s}`);
  }
  assert.notEqual(samples[0], samples[1], "two reads differ");
});

test("--no-rng: the guest has no hardware RNG", { skip, timeout: 900_000 }, async (t) => {
  const r = await runCliAsync(["run", "--no-rng", "--ready-timeout", String(READY_MS / 1000), "--", RNG_SCRIPT], { timeoutMs: READY_MS + 300_000 });
  t.diagnostic(`tskvm run --no-rng: ${r.ms} ms`);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /^rng_current=none$/m, r.stdout);
  assert.match(r.stdout, /^hwrng=$/m, "reading /dev/hwrng gives nothing");
});
