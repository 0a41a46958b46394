/** Memory sizes on the command line: "512M", "2G", "1536" (a bare number is MiB). */

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

export function parseSize(text: string, what = "memory size"): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bBkKmMgGtT]?)(?:i?[bB])?\s*$/.exec(text);
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
