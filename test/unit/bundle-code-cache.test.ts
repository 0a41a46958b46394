/**
 * The bundle's V8 code cache: `npm run build` leaves a first cache (what loading the CLI
 * compiles) marked partial, so a tskvm that cannot write its own tree still starts from
 * compiled code; the first start that can write replaces it with a fuller one, once.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { writeStartupCache } from "../../scripts/bundle";

// dist/, where the build put the bundle; the copy lives beside it so that koffi resolves.
const DIST = join(__dirname, "..", "..");

function startFrom(dir: string): void {
  const loader = join(dir, "tskvm-loader.js");
  const script = `const l = require(${JSON.stringify(loader)}); l.load("src/cli/main.js"); l.load("src/vmm/machine.js").Machine.toString(); l.saveCache();`;
  const r = spawnSync(process.execPath, ["-e", script], { encoding: "utf8", timeout: 60_000 });
  assert.equal(r.status, 0, r.stderr);
}

test("the build's partial code cache is used, then replaced once by a start that can write", { skip: existsSync(join(DIST, "tskvm.js")) ? false : "no dist/tskvm.js: run npm run build" }, () => {
  const dir = mkdtempSync(join(DIST, ".cache-test-"));
  try {
    copyFileSync(join(DIST, "tskvm.js"), join(dir, "tskvm.js"));
    copyFileSync(join(DIST, "tskvm-loader.js"), join(dir, "tskvm-loader.js"));
    const cache = join(dir, "tskvm.js.v8cache");
    assert.equal(writeStartupCache(dir), true);
    assert.ok(statSync(cache).size > 0);
    assert.ok(existsSync(`${cache}.partial`), "the build's cache is marked partial");
    const first = statSync(cache);

    startFrom(dir); // accepts the partial cache, writes a fuller one, drops the mark
    assert.equal(existsSync(`${cache}.partial`), false);
    const second = statSync(cache);
    assert.notEqual(second.ino, first.ino, "the cache was replaced (renamed into place)");
    assert.ok(second.size >= first.size, `the start's cache (${second.size} B) holds at least the build's (${first.size} B)`);

    startFrom(dir); // a whole cache that fits: left alone
    assert.equal(statSync(cache).ino, second.ino);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
