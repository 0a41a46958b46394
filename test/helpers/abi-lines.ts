/**
 * Comparing TypeScript ABI constants with a C program that prints the host headers' values
 * as "name value" lines (native/*_abi.c): what differs, what one side has and the other not.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { buildNative } from "../../scripts/lib/native";

/** Run native/<program>.c and compare its lines with `ts`; fails listing every difference. */
export function assertAbiMatches(program: string, ts: ReadonlyMap<string, number>): void {
  const r = spawnSync(buildNative(program), [], { encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  const c = new Map<string, number>();
  for (const line of r.stdout.trim().split("\n")) {
    const [name, value] = line.split(" ");
    c.set(name!, Number(value));
  }
  const wrong: string[] = [];
  for (const [name, v] of ts) {
    if (!c.has(name)) wrong.push(`${name}: not printed by ${program}.c`);
    else if (c.get(name) !== v) wrong.push(`${name}: TypeScript ${v}, C ${c.get(name)}`);
  }
  for (const name of c.keys()) if (!ts.has(name)) wrong.push(`${name}: printed by ${program}.c, not exported`);
  assert.deepEqual(wrong, []);
}
