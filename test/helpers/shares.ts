/** For Linux-tier tests of shares: directories to share, and the virtiofsd processes serving them. */
import { spawnSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/** Directory `name` under `base` with `files` (name -> text) in it. */
export function freshDir(base: string, name: string, files: Record<string, string> = {}): string {
  const d = join(base, name);
  mkdirSync(d, { recursive: true });
  for (const [f, text] of Object.entries(files)) writeFileSync(join(d, f), text);
  return d;
}

/** virtiofsd processes serving `path` (their command line names it). */
export function virtiofsdFor(path: string): number[] {
  const out = spawnSync("pgrep", ["-f", `virtiofsd.*source=${path}(,| |$)`], { encoding: "utf8" }).stdout;
  return out.split("\n").filter((l) => l.trim() !== "").map(Number);
}
