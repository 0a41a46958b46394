/**
 * A VMM's own memory, guest RAM excluded, from /proc/PID/smaps: the same rule for tskvm and
 * QEMU, so the two compare. Guest RAM is the mapping(s) at least as big as the guest's RAM
 * (tskvm maps it in one piece; QEMU's RAM block is one mapping of that size or a little
 * more); everything else is the VMM's.
 *
 *   rss         resident set, shared file pages included (the executable's text, libraries)
 *   anonymous   resident anonymous memory: heaps, JIT code, stacks; private to the process
 *   file        rss - anonymous: file-backed pages, mostly the executable and libraries,
 *               shared with every other process running the same binary
 */
import { readFileSync } from "node:fs";

export interface VmmMemory {
  rssKiB: number;
  anonymousKiB: number;
  fileKiB: number;
  /** Resident guest RAM that was left out. */
  guestKiB: number;
}

export function vmmMemory(pid: number | "self", guestRamBytes: number): VmmMemory {
  const text = readFileSync(`/proc/${pid}/smaps`, "utf8");
  let rss = 0;
  let anon = 0;
  let guest = 0;
  let isGuest = false;
  for (const line of text.split("\n")) {
    const range = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
    if (range !== null) {
      isGuest = parseInt(range[2]!, 16) - parseInt(range[1]!, 16) >= guestRamBytes;
      continue;
    }
    const m = /^(Rss|Anonymous):\s+(\d+) kB/.exec(line);
    if (m === null) continue;
    const kib = Number(m[2]);
    if (m[1] === "Rss") {
      if (isGuest) guest += kib;
      else rss += kib;
    } else if (!isGuest) {
      anon += kib;
    }
  }
  return { rssKiB: rss, anonymousKiB: anon, fileKiB: rss - anon, guestKiB: guest };
}

export function formatMiB(kib: number): string {
  return `${(kib / 1024).toFixed(1)} MiB`;
}
