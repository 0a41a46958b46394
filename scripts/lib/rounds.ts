/**
 * Alternated rounds and ratios with their spread: how every benchmark figure is taken.
 *
 * A figure is tskvm's rate (or time) beside a baseline's measured in the same run, in
 * rounds that alternate which goes first, so that a slow patch of a shared host hits both.
 * Each round gives one ratio; the figure is the median ratio with the lowest and highest
 * beside it, so a reader sees how much the host moved under the measurement.
 */

export interface Spread {
  median: number;
  min: number;
  max: number;
  rounds: number;
}

export function spread(xs: readonly number[]): Spread {
  if (xs.length === 0) return { median: NaN, min: NaN, max: NaN, rounds: 0 };
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  const median = s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
  return { median, min: s[0]!, max: s[s.length - 1]!, rounds: s.length };
}

export interface PairedResult {
  /** tskvm's figure per round, and its spread. */
  subject: Spread;
  /** The baseline's figure per round, and its spread. */
  baseline: Spread;
  /** subject / baseline per round (higher is better for rates), and its spread. */
  ratio: Spread;
}

/**
 * Run `rounds` pairs of measurements, alternating which of the two goes first; each
 * returns a rate (higher is better) or a time (then pass `lowerIsBetter`: the ratio is
 * baseline / subject, so that above 1 still means tskvm is faster).
 */
export async function paired(
  rounds: number,
  subject: () => number | Promise<number>,
  baseline: () => number | Promise<number>,
  options: { lowerIsBetter?: boolean } = {},
): Promise<PairedResult> {
  const s: number[] = [];
  const b: number[] = [];
  const r: number[] = [];
  for (let i = 0; i < rounds; i++) {
    let si: number;
    let bi: number;
    if (i % 2 === 0) {
      si = await subject();
      bi = await baseline();
    } else {
      bi = await baseline();
      si = await subject();
    }
    s.push(si);
    b.push(bi);
    r.push(options.lowerIsBetter ? bi / si : si / bi);
  }
  return { subject: spread(s), baseline: spread(b), ratio: spread(r) };
}

/** "0.93 (0.90-0.96 over 9 rounds)" */
export function formatRatio(x: Spread, digits = 2): string {
  return `${x.median.toFixed(digits)} (${x.min.toFixed(digits)}-${x.max.toFixed(digits)} over ${x.rounds} rounds)`;
}

/** "12.3 (11.9-13.0)" with a unit */
export function formatSpread(x: Spread, unit: string, digits = 1): string {
  return `${x.median.toFixed(digits)} ${unit} (${x.min.toFixed(digits)}-${x.max.toFixed(digits)})`;
}

/** Same generator as the C baselines (native/blk_baseline.c): xorshift32 from `seed`. */
export function xorshift32(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}
