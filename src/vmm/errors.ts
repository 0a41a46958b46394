/**
 * A configuration the user gave that cannot work (sizes, counts, combinations). Its message
 * is one line saying what is wrong and what to do; `option` is the MachineConfig field at
 * fault, for callers that name their options differently (the API, and through it the
 * CLI's flags) to add.
 */
export class ConfigError extends Error {
  constructor(
    message: string,
    readonly option?: "memoryBytes" | "cpus" | "cpuTemplate",
  ) {
    super(message);
    this.name = "ConfigError";
  }
}
