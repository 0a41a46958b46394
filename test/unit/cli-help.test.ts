/**
 * Help and documentation agree with the parsers: every command has `tskvm help COMMAND`
 * and `tskvm COMMAND --help`; each lists exactly the flags its parser takes; the README's
 * CLI block lists exactly the flags the help texts do.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { COMMAND_FLAGS, COMMAND_USAGE } from "../../src/cli/args";
import { USAGE } from "../../src/cli/main";
import { ExitCode } from "../../src/cli/exit-codes";
import { expectOneLine, runCli } from "../helpers/cli";

const ROOT = join(__dirname, "..", "..", "..");
const COMMANDS = Object.keys(COMMAND_USAGE) as (keyof typeof COMMAND_USAGE)[];

/** The flags an option line defines ("  -k, --kernel PATH   text", "  --version, -V   text"). */
function definedFlags(usage: string): Set<string> {
  const flags = new Set<string>();
  for (const line of usage.split("\n")) {
    const m = /^\s+((?:--?[A-Za-z][\w-]*)(?:, --?[A-Za-z][\w-]*)*)(?:\s|$)/.exec(line);
    if (m === null) continue;
    for (const f of m[1]!.split(", ")) flags.add(f);
  }
  return flags;
}

/** Every flag a block of text names: long ones anywhere, short ones standing alone. */
function namedFlags(text: string): Set<string> {
  const flags = new Set<string>();
  for (const m of text.matchAll(/(?<![\w-])--[a-z][\w-]*/g)) flags.add(m[0]);
  for (const m of text.matchAll(/(?<=[\s[|(])-[A-Za-z](?=[\s\],|)])/g)) flags.add(m[0]);
  return flags;
}

function readmeCliBlock(): string {
  const readme = readFileSync(join(ROOT, "README.md"), "utf8");
  const m = /^## CLI\n\n```\n([\s\S]*?)```/m.exec(readme);
  assert.ok(m, "README.md has a ## CLI section with a code block");
  return m[1]!;
}

const sorted = (s: Set<string>): string[] => [...s].sort();

test("each command's --help lists exactly the flags its parser takes", () => {
  for (const command of COMMANDS) {
    const parser = new Set<string>();
    for (const [name, spec] of Object.entries(COMMAND_FLAGS[command]) as [string, { short?: string }][]) {
      parser.add(`--${name}`);
      if (spec.short !== undefined) parser.add(`-${spec.short}`);
    }
    assert.deepEqual(sorted(definedFlags(COMMAND_USAGE[command])), sorted(parser), `tskvm ${command} --help`);
  }
});

test("the README's CLI block names exactly the flags of the help texts", () => {
  const help = new Set<string>(definedFlags(USAGE));
  for (const command of COMMANDS) for (const f of definedFlags(COMMAND_USAGE[command])) help.add(f);
  const readme = namedFlags(readmeCliBlock());
  const missing = sorted(help).filter((f) => !readme.has(f));
  const extra = sorted(readme).filter((f) => !help.has(f));
  assert.deepEqual({ missingFromReadme: missing, notInHelp: extra }, { missingFromReadme: [], notInHelp: [] });
  // And every command has its line there.
  for (const command of [...COMMANDS, "help"]) assert.match(readmeCliBlock(), new RegExp(`^tskvm ${command}\\b`, "m"), command);
});

test("tskvm help COMMAND and tskvm COMMAND --help / -h print the same text for every command", () => {
  for (const command of COMMANDS) {
    const viaHelp = runCli(["help", command]);
    assert.equal(viaHelp.status, 0, command);
    assert.equal(viaHelp.stdout, `${COMMAND_USAGE[command]}\n`);
    assert.match(viaHelp.stdout, new RegExp(`^usage: tskvm ${command}\\b`));
    for (const flag of ["--help", "-h"]) {
      const r = runCli([command, flag]);
      assert.equal(r.status, 0, `${command} ${flag}: ${r.stderr}`);
      assert.equal(r.stdout, viaHelp.stdout, `${command} ${flag}`);
    }
  }
  const top = runCli(["help"]);
  assert.equal(top.status, 0);
  assert.equal(top.stdout, `${USAGE}\n`);
  for (const command of COMMANDS) assert.match(top.stdout, new RegExp(`^  ${command} `, "m"), `tskvm --help lists ${command}`);
  expectOneLine(runCli(["help", "frob"]), ExitCode.USAGE, /no help for 'frob': use tskvm help boot\|run\|mkdisk\|probe/);
  expectOneLine(runCli(["help", "run", "boot"]), ExitCode.USAGE, /tskvm help takes one command/);
});
