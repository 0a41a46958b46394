import { test } from "node:test";
import assert from "node:assert/strict";
import { formatSeconds, missingPackages, packagePlan } from "../../scripts/lib/setup-plan";

test("npm start's package plan: nothing missing, root, passwordless sudo, a password, no apt", () => {
  const host = { root: false, sudo: false, apt: true };
  assert.deepEqual(packagePlan([], host), { kind: "none" });
  assert.deepEqual(packagePlan(["bc", "cpio"], { ...host, root: true }), { kind: "install", argv: ["apt-get", "install", "-y", "--no-install-recommends", "bc", "cpio"] });
  assert.deepEqual(packagePlan(["bc"], { ...host, sudo: true }), { kind: "install", argv: ["sudo", "-n", "apt-get", "install", "-y", "--no-install-recommends", "bc"] });
  const ask = packagePlan(["bc", "cpio"], host);
  assert.equal(ask.kind, "ask");
  assert.equal(ask.kind === "ask" && ask.command, "sudo apt-get install -y --no-install-recommends bc cpio");
  const noApt = packagePlan(["bc"], { root: true, sudo: false, apt: false });
  assert.equal(noApt.kind, "ask", "without apt nothing is installed, even as root");
  assert.match(noApt.kind === "ask" ? noApt.why : "", /not a Debian-like system/);
});

test("missing packages from dpkg-query's status lines; architecture suffixes and half-installed ones", () => {
  const out = ["bc installed", "cpio not-installed", "libc6:amd64 installed", "flex half-configured", ""].join("\n");
  assert.deepEqual(missingPackages(["bc", "cpio", "libc6", "flex", "bison"], out), ["cpio", "flex", "bison"]);
  assert.deepEqual(missingPackages(["bc"], ""), ["bc"]);
});

test("formatSeconds", () => {
  assert.equal(formatSeconds(4.4), "4 s");
  assert.equal(formatSeconds(130), "2 min 10 s");
});
