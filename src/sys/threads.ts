/**
 * Starting worker threads, from dist/ or from the bundle (scripts/bundle.ts). When tskvm
 * runs from the bundle (bin/tskvm sets it with useBundle: the bundle's loader), a worker
 * starts from the same one file instead of resolving and reading its ~30 modules again.
 */
import { relative, dirname } from "node:path";
import { Worker, type WorkerOptions } from "node:worker_threads";

let bundleFile: string | undefined;

/** Start workers through the bundle loader `file` (called once by bin/tskvm before anything starts). */
export function useBundle(file: string): void {
  bundleFile = file;
}

/** A worker running the compiled module `file` (an absolute path in dist/). */
export function startWorker(file: string, options: WorkerOptions): Worker {
  if (bundleFile === undefined) return new Worker(file, options);
  const key = relative(dirname(bundleFile), file);
  return new Worker(`require(${JSON.stringify(bundleFile)}).load(${JSON.stringify(key)});`, { ...options, eval: true });
}
