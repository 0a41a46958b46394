/**
 * Run as a program (node virtiofsd-probe.js DIR [ro]): start virtiofsd for DIR the way tskvm
 * does, speak FUSE to it (INIT, read hello.txt, create a file), and print one JSON line with
 * what happened. Tests run it as another user (setpriv) to check the unprivileged path.
 */
import { createRuntimeDir } from "../../src/host/helper-process";
import { startVirtiofsd } from "../../src/host/virtiofsd";
import { FuseClient } from "./fuse-client";

async function main(): Promise<void> {
  const [dir, mode] = process.argv.slice(2);
  const runtime = createRuntimeDir("probe");
  const result: Record<string, unknown> = { uid: process.getuid!() };
  try {
    const d = await startVirtiofsd({ hostPath: dir!, tag: "probe", readOnly: mode === "ro" }, { runtimeDir: runtime.path, index: 0 });
    const c = new FuseClient(d.frontend);
    try {
      result.init = c.init();
      const node = c.lookup(1n, "hello.txt");
      result.read = typeof node === "bigint" ? c.readFile(node) : node;
      result.create = c.createFile(1n, `created-by-${process.getuid!()}-${Date.now()}`, "probe\n");
    } finally {
      result.exit = await d.stop();
      c.close();
    }
  } catch (e) {
    result.error = (e as Error).message;
  } finally {
    runtime.remove();
  }
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

void main();
