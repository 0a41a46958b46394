/**
 * Checks src/kvm/abi.ts against the host's <linux/kvm.h>: native/abi_check.c prints every
 * struct size, field offset, ioctl number and constant as "name value", and this test
 * compares them, in both directions, with what abi.ts exports.
 *
 * Name mapping (abi_check.c follows it):
 *   Kvm* layout objects    every numeric property, nested ones by dotted path
 *                          (KvmRun.size, KvmRun.io.port); a string array lists equally
 *                          sized fields in order (KvmRegs.fields -> KvmRegs.rax 0, ...)
 *   other objects          constant groups: Ioctl.GET_REGS, Cap.IRQCHIP, ExitReason.IO
 *   numbers                top-level constants: KVM_API_VERSION, KVM_IRQFD_FLAG_RESAMPLE
 *   functions              not data; listed in NOT_DATA below with the reason
 * Any other kind of export fails the test, so nothing in abi.ts goes unchecked.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import * as abi from "../../src/kvm/abi";
import { buildNative } from "../../scripts/lib/native";

/** Exports that carry no ABI value of their own. */
const NOT_DATA: Record<string, string> = {
  io: "ioctl encoder, checked through every Ioctl value",
  ior: "ioctl encoder, checked through every Ioctl value",
  iow: "ioctl encoder, checked through every Ioctl value",
  iowr: "ioctl encoder, checked through every Ioctl value",
  exitReasonName: "formatting helper over ExitReason",
};

interface Expected {
  /** name -> value, as abi.ts has it */
  values: Map<string, number>;
  /** exports or properties the walk could not turn into a checkable value */
  unsupported: string[];
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Walks every export of abi.ts into name -> value pairs. */
function expectedFromAbi(): Expected {
  const values = new Map<string, number>();
  const unsupported: string[] = [];
  const put = (name: string, value: unknown): void => {
    if (typeof value !== "number" || !Number.isSafeInteger(value) || value < 0) {
      unsupported.push(`${name} (value ${String(value)} is not a non-negative integer)`);
      return;
    }
    values.set(name, value);
  };

  const walkLayout = (prefix: string, obj: Record<string, unknown>, size: unknown): void => {
    for (const [key, v] of Object.entries(obj)) {
      const name = `${prefix}.${key}`;
      if (typeof v === "number") put(name, v);
      else if (isPlainObject(v)) walkLayout(name, v, size);
      else if (Array.isArray(v) && v.every((f) => typeof f === "string")) {
        // An ordered list of equally sized fields that fill the struct.
        if (typeof size !== "number" || v.length === 0 || size % v.length !== 0) {
          unsupported.push(`${name} (field list needs a size divisible by its length)`);
          continue;
        }
        const width = size / v.length;
        v.forEach((field: string, i) => put(`${prefix}.${field}`, i * width));
      } else unsupported.push(`${name} (${typeof v})`);
    }
  };

  for (const [name, v] of Object.entries(abi as Record<string, unknown>)) {
    if (typeof v === "function") {
      if (!(name in NOT_DATA)) unsupported.push(`${name} (function not listed in NOT_DATA)`);
    } else if (typeof v === "number") {
      put(name, v);
    } else if (isPlainObject(v) && name.startsWith("Kvm")) {
      walkLayout(name, v, v["size"]);
    } else if (isPlainObject(v)) {
      for (const [key, c] of Object.entries(v)) put(`${name}.${key}`, c);
    } else {
      unsupported.push(`${name} (${typeof v})`);
    }
  }
  return { values, unsupported };
}

let cache: Map<string, number> | undefined;

/** Builds and runs native/abi_check.c; returns its name -> value lines. */
function fromC(): Map<string, number> {
  if (cache !== undefined) return cache;
  const bin = buildNative("abi_check");
  const r = spawnSync(bin, [], { encoding: "utf8" });
  if (r.error !== undefined) throw r.error;
  assert.equal(r.status, 0, `${bin} exited with ${r.status ?? r.signal}: ${r.stderr}`);
  const out = new Map<string, number>();
  const bad: string[] = [];
  for (const line of r.stdout.split("\n")) {
    if (line === "") continue;
    const m = /^([A-Za-z_][A-Za-z0-9_.]*) (\d+)$/.exec(line);
    if (m === null) {
      bad.push(`unparsable line ${JSON.stringify(line)}`);
      continue;
    }
    const [, name, digits] = m as unknown as [string, string, string];
    const value = Number(digits);
    if (!Number.isSafeInteger(value)) bad.push(`${name}: value ${digits} is too large`);
    else if (out.has(name)) bad.push(`${name}: printed twice`);
    else out.set(name, value);
  }
  assert.deepEqual(bad, [], `abi_check output problems:\n  ${bad.join("\n  ")}`);
  assert.ok(out.size > 0, "abi_check printed nothing");
  cache = out;
  return out;
}

test("abi.ts exports only values this test knows how to check", () => {
  const { unsupported } = expectedFromAbi();
  assert.deepEqual(unsupported, [], `unchecked exports in src/kvm/abi.ts:\n  ${unsupported.join("\n  ")}`);
});

test("every value in abi.ts matches the host's <linux/kvm.h>", () => {
  const c = fromC();
  const mismatches: string[] = [];
  for (const [name, value] of expectedFromAbi().values) {
    const cValue = c.get(name);
    if (cValue !== undefined && cValue !== value) {
      mismatches.push(`${name}: abi.ts has ${value} (0x${value.toString(16)}), C has ${cValue} (0x${cValue.toString(16)})`);
    }
  }
  assert.deepEqual(mismatches, [], `abi.ts disagrees with the C headers:\n  ${mismatches.join("\n  ")}`);
});

test("abi_check.c covers every value abi.ts exports", () => {
  const c = fromC();
  const missing = [...expectedFromAbi().values.keys()].filter((name) => !c.has(name));
  assert.deepEqual(missing, [], `not printed by native/abi_check.c (add them there):\n  ${missing.join("\n  ")}`);
});

test("abi_check.c prints nothing that abi.ts lacks", () => {
  const expected = expectedFromAbi().values;
  const extra = [...fromC().keys()].filter((name) => !expected.has(name));
  assert.deepEqual(extra, [], `printed by abi_check but not exported by abi.ts (name mapping broken?):\n  ${extra.join("\n  ")}`);
});

test("the walk is not vacuous", () => {
  // Guards the generic walk itself: a few entries it must have produced.
  const v = expectedFromAbi().values;
  for (const name of ["KvmRegs.rip", "KvmRun.io.port", "KvmRun.size", "Ioctl.RUN", "Cap.IRQCHIP", "ExitReason.IO", "KVM_API_VERSION"]) {
    assert.ok(v.has(name), `expected ${name} among the abi.ts values`);
  }
  assert.ok(v.size >= 200, `only ${v.size} values walked`);
});
