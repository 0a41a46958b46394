/**
 * The guest agent's protocol, host side: quoting a command for the agent's busybox ash,
 * parsing its control lines, splitting the shared output pipe back into channels.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import {
  Channel,
  ChannelDemux,
  LineSplitter,
  MAX_COMMAND_BYTES,
  commandLine,
  parseControlLine,
  runRequest,
  shellAnsiQuote,
  shellQuote,
} from "../../src/api/protocol";

/** The guest runs busybox ash; the host's busybox (busybox-static, a guest build dependency) is the same shell. */
const shell = existsSync("/usr/bin/busybox") || existsSync("/bin/busybox") ? ["busybox", "sh"] : ["bash"];

function evalInShell(script: string): string {
  const r = spawnSync(shell[0]!, [...shell.slice(1), "-c", script], { encoding: "latin1" });
  assert.equal(r.status, 0, r.stderr);
  return r.stdout;
}

const tricky = [
  "echo hi",
  "it's a \"test\" with \\ backslashes \\\\ and $HOME `pwd` $(id)",
  "line one\nline two\r\n\ttabbed",
  "ünïcödé ✓ 漢字",
  "'''\\'\\\\'",
  "\x01\x1b[31mred\x7f",
  " leading and trailing spaces ",
];

test("shellAnsiQuote: the agent's eval of $'...' gives back exactly the command, byte for byte", () => {
  for (const text of tricky) {
    const quoted = shellAnsiQuote(text);
    assert.match(quoted, /^\$'[\x20-\x7e]*'$/, "printable ASCII only, one line");
    // What the agent does: eval "cmd=$arg", then the command is "$cmd".
    const back = evalInShell(`eval "cmd=${quoted.replace(/(["$`\\])/g, "\\$1")}"; printf '%s' "$cmd"`);
    assert.equal(Buffer.from(back, "latin1").toString("utf8"), text, JSON.stringify(text));
  }
  assert.throws(() => shellAnsiQuote("a\0b"), /NUL/);
});

test("commandLine: one string is a shell command line, an array is argv quoted word by word", () => {
  assert.equal(commandLine("make -C /mnt check"), "make -C /mnt check");
  assert.equal(commandLine(["sh", "-c", "exit 3"]), "sh -c 'exit 3'");
  assert.equal(commandLine(["echo", "it's", ""]), "echo 'it'\\''s' ''");
  assert.equal(shellQuote("/mnt/a-b_c.d:1,2@x+y=z%"), "/mnt/a-b_c.d:1,2@x+y=z%");
  assert.throws(() => commandLine([]), /empty/);
  // Round trip through a real shell: the arguments arrive unchanged.
  const args = ["a b", "it's", "$HOME", "*", "", "x\ny"];
  const out = evalInShell(`set -- ${commandLine(args)}; for a in "$@"; do printf '[%s]' "$a"; done`);
  assert.equal(out, args.map((a) => `[${a}]`).join(""));
});

test("runRequest: one line with the id; empty, NUL and oversized commands are refused", () => {
  assert.equal(runRequest(7, "echo hi"), "RUN 7 $'echo hi'\n");
  assert.equal(runRequest(1, "a\nb").split("\n").length, 2, "the command's newline is escaped");
  assert.throws(() => runRequest(1, "  "), /empty/);
  assert.throws(() => runRequest(1, "x".repeat(MAX_COMMAND_BYTES + 1)), /at most/);
});

test("parseControlLine: READY, START, EXIT; anything else is not a control message", () => {
  assert.deepEqual(parseControlLine("TSKVM-CTL READY nproc=4"), { type: "ready", nproc: 4, unmounted: [] });
  assert.deepEqual(parseControlLine("TSKVM-CTL READY nproc=1 unmounted=src,tskvm-rootfs"), { type: "ready", nproc: 1, unmounted: ["src", "tskvm-rootfs"] });
  assert.deepEqual(parseControlLine("TSKVM-CTL START 12\r"), { type: "start", id: 12 });
  assert.deepEqual(parseControlLine("TSKVM-CTL EXIT 12 130"), { type: "exit", id: 12, status: 130 });
  for (const bad of ["", "hello", "TSKVM-CTL EXIT 1", "TSKVM-CTL EXIT 1 256", "TSKVM-CTL EXIT x 1", "TSKVM-CTL READY", "TSKVM-CTL BOGUS 1", " TSKVM-CTL START 1", "TSKVM-GUEST-READY nproc=1"]) {
    assert.equal(parseControlLine(bad), undefined, bad);
  }
});

test("ChannelDemux: [tag, byte] pairs back to per-channel runs, pairs split across reads", () => {
  const got: [number, string][] = [];
  const d = new ChannelDemux((tag, bytes) => got.push([tag, bytes.toString("latin1")]));
  const pairs = (tag: number, s: string) => Buffer.from([...Buffer.from(s, "latin1")].flatMap((b) => [tag, b]));
  const all = Buffer.concat([pairs(Channel.CONSOLE, "boot\n"), pairs(Channel.STDOUT, "out"), pairs(Channel.STDERR, "e"), pairs(Channel.STDOUT, "!"), pairs(Channel.CONTROL, "X\n")]);
  // Feed it in odd-sized pieces so that a tag and its byte often arrive apart.
  for (let at = 0; at < all.length; at += 3) d.push(all.subarray(at, at + 3));
  const joined = new Map<number, string>();
  for (const [tag, s] of got) joined.set(tag, (joined.get(tag) ?? "") + s);
  assert.equal(joined.get(Channel.CONSOLE), "boot\n");
  assert.equal(joined.get(Channel.STDOUT), "out!");
  assert.equal(joined.get(Channel.STDERR), "e");
  assert.equal(joined.get(Channel.CONTROL), "X\n");
  // Order across channels is kept: stdout's "out" before stderr's "e" before stdout's "!".
  const order = got.map(([t]) => t).filter((t, i, a) => i === 0 || a[i - 1] !== t);
  assert.deepEqual(order, [Channel.CONSOLE, Channel.STDOUT, Channel.STDERR, Channel.STDOUT, Channel.CONTROL]);
});

test("LineSplitter: whole lines only, the rest kept for later; a runaway line is cut", () => {
  const lines: string[] = [];
  const s = new LineSplitter((l) => lines.push(l), 16);
  s.push(Buffer.from("TSKVM-CTL RE"));
  s.push(Buffer.from("ADY nproc=1\nTSKVM"));
  assert.deepEqual(lines, ["TSKVM-CTL READY nproc=1"]);
  s.push(Buffer.from("-CTL START 1\n"));
  assert.deepEqual(lines, ["TSKVM-CTL READY nproc=1", "TSKVM-CTL START 1"]);
  s.push(Buffer.from("x".repeat(100)));
  s.push(Buffer.from("\n"));
  assert.equal(lines[2]!.length, 16);
});
