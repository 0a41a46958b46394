/**
 * Run a tiny guest on a real Machine with its console captured in a temp file.
 */
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Machine, MachineConfig, MachineResult } from "../../src/vmm/machine";

export interface TinyRun {
  result: MachineResult;
  console: Buffer;
}

export async function runTinyGuest(
  config: Omit<MachineConfig, "consoleFd" | "memoryBytes"> & { memoryBytes?: number },
  whileRunning?: (m: Machine) => void | Promise<void>,
): Promise<TinyRun> {
  const dir = mkdtempSync(join(tmpdir(), "tskvm-test-"));
  const path = join(dir, "console");
  const fd = openSync(path, "w");
  try {
    const machine = Machine.create({ memoryBytes: 16 * 1024 * 1024, ...config, consoleFd: fd });
    try {
      const running = machine.run();
      if (whileRunning !== undefined) await whileRunning(machine);
      const result = await running;
      return { result, console: readFileSync(path) };
    } finally {
      machine.destroy();
    }
  } finally {
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  }
}
