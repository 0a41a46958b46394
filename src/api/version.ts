/** tskvm's version, from its package.json ("unknown" when that cannot be read). */
import { readFileSync } from "node:fs";
import { resolve } from "node:path";

export const TSKVM_VERSION: string = (() => {
  try {
    // dist/src/api/version.js -> the package root.
    return (JSON.parse(readFileSync(resolve(__dirname, "..", "..", "..", "package.json"), "utf8")) as { version: string }).version;
  } catch {
    return "unknown";
  }
})();
