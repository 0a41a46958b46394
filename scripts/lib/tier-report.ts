/** What scripts/lib/tier-reporter.ts reports for one `node --test` run (one tier). */
export interface TierCounts {
  tests: number;
  pass: number;
  fail: number;
  skipped: number;
  todo: number;
  cancelled: number;
}

export interface TierReport extends TierCounts {
  durationMs: number;
  skips: { file: string; name: string; reason: string }[];
  failures: { file: string; name: string; error: string }[];
}
