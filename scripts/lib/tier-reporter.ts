/**
 * A node:test reporter (`--test-reporter=dist/scripts/lib/tier-reporter.js`) that yields
 * one JSON object for the whole run: the runner's own totals, and every skipped and failed
 * test with its reason. scripts/test.ts reads it to print where each tier ran and to fail
 * a run in which a tier that should have run skipped tests.
 */
import type { TierCounts, TierReport } from "./tier-report";

interface TestEventData {
  name?: string;
  nesting?: number;
  file?: string;
  skip?: string | boolean;
  message?: string;
  details?: { type?: string; error?: { message?: string; cause?: unknown } };
}

async function* tierReporter(source: AsyncIterable<{ type: string; data: TestEventData }>): AsyncGenerator<string> {
  const report: TierReport = { tests: 0, pass: 0, fail: 0, skipped: 0, todo: 0, cancelled: 0, durationMs: 0, skips: [], failures: [] };
  for await (const event of source) {
    const d = event.data;
    if (event.type === "test:diagnostic" && d.nesting === 0 && d.message !== undefined) {
      // The runner's totals: "tests 30", "pass 29", "skipped 1", "duration_ms 1234.5".
      const m = /^(tests|pass|fail|skipped|todo|cancelled|duration_ms) ([\d.]+)$/.exec(d.message);
      if (m !== null) {
        if (m[1] === "duration_ms") report.durationMs = Math.round(Number(m[2]));
        else report[m[1] as keyof TierCounts] = Number(m[2]);
      }
    } else if (event.type === "test:pass" && d.skip !== undefined && d.skip !== false && d.details?.type !== "suite") {
      report.skips.push({ file: d.file ?? "", name: d.name ?? "", reason: typeof d.skip === "string" ? d.skip : "" });
    } else if (event.type === "test:fail" && d.details?.type !== "suite") {
      const err = d.details?.error;
      const cause = err?.cause instanceof Error ? err.cause.message : typeof err?.cause === "string" ? err.cause : undefined;
      report.failures.push({ file: d.file ?? "", name: d.name ?? "", error: (cause ?? err?.message ?? "").split("\n")[0] ?? "" });
    }
  }
  yield `${JSON.stringify(report)}\n`;
}

// node --test loads a reporter with import(): for a CommonJS module that is module.exports.
export = tierReporter;
