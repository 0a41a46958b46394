/**
 * The npm package as a user gets it: `npm pack` ships the CLI, the compiled API with its
 * types and the guest's build scripts, and none of the tests, build scripts or CI; the
 * tarball installs into an empty project without the network (koffi from npm's cache, as
 * `npm ci` left it), where `npx tskvm --help`, `require("tskvm")` and the API's types work.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync, type SpawnSyncReturns } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const ROOT = join(__dirname, "..", "..", "..");
const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as {
  name: string;
  version: string;
  dependencies: Record<string, string>;
  bin: Record<string, string>;
};

function run(cmd: string, args: string[], cwd: string): SpawnSyncReturns<string> {
  const r = spawnSync(cmd, args, { cwd, encoding: "utf8", timeout: 120_000, env: { ...process.env, npm_config_audit: "false", npm_config_fund: "false", npm_config_update_notifier: "false" } });
  assert.equal(r.status, 0, `${cmd} ${args.join(" ")}: ${r.error?.message ?? ""}${r.stderr}`);
  return r;
}

test("npm pack ships bin, the compiled API with types, the guest's scripts; installed offline, npx tskvm and require work", { timeout: 300_000 }, () => {
  const dir = mkdtempSync(join(tmpdir(), "tskvm-pack-"));
  try {
    // --ignore-scripts: pack dist/ as the test run built it (prepare would rebuild it under the running tests).
    const packed = JSON.parse(run("npm", ["pack", "--ignore-scripts", "--json", "--pack-destination", dir], ROOT).stdout) as { filename: string; files: { path: string }[] }[];
    const files = packed[0]!.files.map((f) => f.path);
    for (const f of ["package.json", "README.md", "bin/tskvm", "dist/src/index.js", "dist/src/index.d.ts", "dist/src/cli/main.js", "dist/src/vcpu/worker.js", "dist/src/io/io-worker.js", "guest/build.sh", "guest/deps.sh", "guest/kernel/tskvm.config", "guest/initrd/init"]) {
      assert.ok(files.includes(f), `the package has ${f}`);
    }
    const stray = files.filter((f) => /^(test|src|scripts|native|docs|\.ci|dist\/test|dist\/scripts)\//.test(f) || f.endsWith(".map") || f.endsWith(".ts") && !f.endsWith(".d.ts"));
    assert.deepEqual(stray, [], "no tests, sources, build scripts, CI or source maps");

    // An empty project that depends on the tarball; its lock file names the registry's
    // tarballs of tskvm's dependencies, which npm's cache holds since npm ci.
    const app = join(dir, "app");
    mkdirSync(app);
    const tarball = `file:../${packed[0]!.filename}`;
    const ourLock = JSON.parse(readFileSync(join(ROOT, "package-lock.json"), "utf8")) as { packages: Record<string, { version: string }> };
    const packages: Record<string, unknown> = {
      "": { name: "app", dependencies: { [pkg.name]: tarball } },
      [`node_modules/${pkg.name}`]: { version: pkg.version, resolved: tarball, dependencies: pkg.dependencies, bin: pkg.bin },
    };
    const deps = new Set(Object.keys(pkg.dependencies));
    for (const [path, entry] of Object.entries(ourLock.packages)) {
      const name = path.replace(/^node_modules\//, "");
      if (!path.startsWith("node_modules/") || name.includes("node_modules/")) continue;
      const optionalOf = [...deps].some((d) => (ourLock.packages[`node_modules/${d}`] as { optionalDependencies?: Record<string, string> } | undefined)?.optionalDependencies?.[name] !== undefined);
      if (!deps.has(name) && !optionalOf) continue;
      packages[path] = { ...entry, resolved: `https://registry.npmjs.org/${name}/-/${name.split("/").pop()}-${entry.version}.tgz` };
    }
    writeFileSync(join(app, "package.json"), JSON.stringify({ name: "app", private: true, dependencies: { [pkg.name]: tarball } }));
    writeFileSync(join(app, "package-lock.json"), JSON.stringify({ name: "app", lockfileVersion: 3, requires: true, packages }));
    run("npm", ["ci", "--offline"], app);

    const help = run("npx", ["--offline", "tskvm", "--help"], app);
    assert.match(help.stdout, /^usage: tskvm <command>/);
    assert.match(run("npx", ["--offline", "tskvm", "help", "run"], app).stdout, /^usage: tskvm run/);
    const api = run(process.execPath, ["-e", 'const t = require("tskvm"); console.log(typeof t.startVm, typeof t.makeDiskImage, require("tskvm/package.json").version)'], app);
    assert.equal(api.stdout.trim(), `function function ${pkg.version}`);

    // The types come with it: a wrong option type is a compile error.
    writeFileSync(
      join(app, "check.ts"),
      'import { startVm, type VmOptions } from "tskvm";\n' +
        'const ok: VmOptions = { memory: "512M", cpus: 2, rng: false, disks: ["a.img"] };\n' +
        '// @ts-expect-error rng is a boolean\nconst bad: VmOptions = { rng: "no" };\n' +
        "export const start: typeof startVm = startVm;\nexport { ok, bad };\n",
    );
    writeFileSync(
      join(app, "tsconfig.json"),
      JSON.stringify({ compilerOptions: { strict: true, module: "node16", moduleResolution: "node16", noEmit: true, skipLibCheck: true, types: [] }, files: ["check.ts"] }),
    );
    run(process.execPath, [join(ROOT, "node_modules", "typescript", "bin", "tsc"), "-p", "tsconfig.json"], app);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
