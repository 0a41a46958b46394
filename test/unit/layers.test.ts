/**
 * The import direction of src/: no module imports from a layer above its own (the table
 * is test/helpers/layers.ts), and device models use neither sys/ nor kvm/. The checker is
 * first shown to catch violations, so that this test cannot pass by reading nothing.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { ENTRY, LAYERS, checkLayers, importsOf, readSources, type SourceFile } from "../helpers/layers";

const SRC = resolve(__dirname, "..", "..", "..", "src");

describe("the layer checker", () => {
  const files: SourceFile[] = [
    { path: "sys/libc.ts", text: "export const x = 1;" },
    { path: "memory/guest-memory.ts", text: 'import * as sys from "../sys/libc";' },
    { path: "arch/x86/layout.ts", text: 'import type { RamRange } from "../../memory/guest-memory";' },
    { path: "vmm/machine.ts", text: "export class Machine {}" },
    { path: "board/devices.ts", text: "" },
    { path: "devices/bus.ts", text: "" },
  ];
  const known = new Set(files.map((f) => f.path));
  const check = (extra: SourceFile) => checkLayers([...files, extra], (p) => known.has(p) || p === extra.path);

  it("accepts imports from the own layer and below", () => {
    assert.deepEqual(checkLayers(files, (p) => known.has(p)), []);
  });

  it("catches an import from a layer above, however it is written", () => {
    const cases: [string, string][] = [
      ["memory/bad.ts", 'import { ramLayout } from "../arch/x86/layout";'],
      ["sys/bad.ts", 'import type { Machine } from "../vmm/machine";'],
      ["board/bad.ts", 'export { Machine } from "../vmm/machine";'],
      ["devices/virtio/bad.ts", 'const m = import("../../vmm/machine");'],
      ["memory/bad.ts", 'import "../board/devices";'],
    ];
    for (const [path, text] of cases) {
      const v = check({ path, text });
      assert.equal(v.length, 1, `${path}: ${text}`);
      assert.match(v[0]!.why, /a layer above it/);
    }
  });

  it("catches a device model that uses sys/ or kvm/", () => {
    const v = check({ path: "devices/virtio/bad.ts", text: 'import * as sys from "../../sys/libc";' });
    assert.equal(v.length, 1);
    assert.match(v[0]!.why, /devices\/ may not use sys\//);
  });

  it("catches a folder no layer holds, and an import it cannot resolve", () => {
    assert.match(check({ path: "misc/x.ts", text: "" })[0]!.why, /in no layer/);
    assert.match(check({ path: "vmm/x.ts", text: 'import "./nowhere";' })[0]!.why, /cannot be resolved/);
  });

  it("reads every kind of import", () => {
    assert.deepEqual(
      importsOf('import a from "./a"; import type { B } from "./b"; export * from "./c"; import("./d"); import "./e";').sort(),
      ["./a", "./b", "./c", "./d", "./e"],
    );
  });
});

describe("src/ keeps the direction", () => {
  it("has no import from a layer above, and device models stay pure", () => {
    const sources = readSources(SRC);
    assert.ok(sources.length > 50, `read ${sources.length} files from ${SRC}`);
    const folders = new Set(sources.map((s) => (s.path.includes("/") ? s.path.split("/")[0]! : ENTRY)));
    for (const layer of LAYERS) for (const f of layer.folders) assert.ok(folders.has(f), `layer folder ${f}/ exists in src/`);
    const violations = checkLayers(sources, (p) => existsSync(join(SRC, p)));
    assert.deepEqual(
      violations.map((v) => `${v.file}: ${v.imports} (${v.why})`),
      [],
    );
  });
});
