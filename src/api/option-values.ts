/**
 * Option values given as text, by the API's string options and the CLI's flags alike:
 * sizes ("512M"), disks ("img,readonly"), MAC addresses. Each parser throws an error of
 * its own with a one-line message that names the value and says what would be right.
 */
import { DiskImageError } from "../host/disk-image";
import { VIRTIO_BLK_ID_BYTES } from "../devices/virtio/blk/request";

export class SizeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "SizeError";
  }
}

const UNITS: Record<string, number> = {
  "": 1024 ** 2,
  B: 1,
  K: 1024,
  M: 1024 ** 2,
  G: 1024 ** 3,
  T: 1024 ** 4,
};

/** A memory or image size: "512M", "2G", "1536" (a bare number is MiB); a positive multiple of 4 KiB. */
export function parseSize(text: string, what = "memory size"): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bBkKmMgGtT]?)(?:i?[bB])?\s*$/.exec(text);
  if (m === null && /^\s*-\s*\d/.test(text)) throw new SizeError(`bad ${what} '${text}': it must be more than zero`);
  if (m === null) {
    throw new SizeError(
      `bad ${what} '${text}': use a number with an optional K, M or G suffix (a bare number means MiB), e.g. 512M or 2G`,
    );
  }
  const bytes = Math.round(Number(m[1]) * UNITS[m[2]!.toUpperCase()]!);
  if (!Number.isSafeInteger(bytes) || bytes <= 0) {
    throw new SizeError(`bad ${what} '${text}': it must be more than zero`);
  }
  if (bytes % 4096 !== 0) {
    throw new SizeError(`bad ${what} '${text}': it must be a multiple of 4 KiB`);
  }
  return bytes;
}

/** A MAC address string that does not parse. */
export class MacAddressError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "MacAddressError";
  }
}

/** "52:54:00:12:34:56" (or with "-") -> 6 bytes; a unicast address only. */
export function parseMac(text: string): Uint8Array {
  const parts = text.trim().split(/[:-]/);
  if (parts.length !== 6 || parts.some((p) => !/^[0-9a-fA-F]{1,2}$/.test(p))) {
    throw new MacAddressError(`MAC address "${text}" is not six hex bytes separated by colons (e.g. 52:54:00:12:34:56)`);
  }
  const mac = Uint8Array.from(parts.map((p) => parseInt(p, 16)));
  if ((mac[0]! & 1) !== 0) throw new MacAddressError(`MAC address "${text}" is a multicast address: a NIC needs a unicast one (even first byte)`);
  if (mac.every((b) => b === 0)) throw new MacAddressError(`MAC address "${text}" is all zeroes`);
  return mac;
}

export function formatMac(mac: Uint8Array): string {
  return Array.from(mac.subarray(0, 6), (b) => b.toString(16).padStart(2, "0")).join(":");
}

export interface DiskOption {
  path: string;
  readOnly: boolean;
  /** The GET_ID serial, when given (at most 20 ASCII characters). */
  serial?: string;
}

/** A disk serial (GET_ID) has at most this many characters. */
export const MAX_SERIAL_LENGTH = VIRTIO_BLK_ID_BYTES;

/**
 * A disk given as text, "path[,readonly][,serial=ID]" (the API's string disks, the CLI's
 * --disk). Errors are DiskImageErrors, like those of the image itself. A path containing a comma cannot be given (as in
 * QEMU's -drive without doubling commas); rename or symlink it.
 */
export function parseDiskOption(spec: string): DiskOption {
  const { head: path, options } = splitOptionList(spec);
  if (path === "") throw new DiskImageError("", `disk option "${spec}" has no image path (expected path[,readonly][,serial=ID])`);
  const out: DiskOption = { path, readOnly: false };
  for (const { text: opt, key, value } of options) {
    if (key === "readonly" || key === "ro") {
      const on = onOff(value);
      if (on === undefined) throw new DiskImageError(path, `disk option "${opt}" in "${spec}": readonly takes on or off`);
      out.readOnly = on;
    } else if (key === "serial") {
      if (value === undefined || value.length > MAX_SERIAL_LENGTH || !/^[\x20-\x7e]*$/.test(value)) {
        throw new DiskImageError(path, `disk option "${opt}" in "${spec}": serial must be up to ${MAX_SERIAL_LENGTH} printable ASCII characters`);
      }
      out.serial = value;
    } else {
      throw new DiskImageError(path, `unknown disk option "${opt}" in "${spec}" (known: readonly, serial=ID)`);
    }
  }
  return out;
}

/** "head,key=value,flag" -> the head and each option (split at its first '='). */
export function splitOptionList(spec: string): { head: string; options: { text: string; key: string; value: string | undefined }[] } {
  const [head, ...rest] = spec.split(",");
  return {
    head: head!,
    options: rest.map((text) => {
      const eq = text.indexOf("=");
      return { text, key: eq < 0 ? text : text.slice(0, eq), value: eq < 0 ? undefined : text.slice(eq + 1) };
    }),
  };
}

/** A flag option's value: absent, "on" or "true" is true, "off" or "false" false, else undefined. */
export function onOff(value: string | undefined): boolean | undefined {
  if (value === undefined || value === "on" || value === "true") return true;
  if (value === "off" || value === "false") return false;
  return undefined;
}
