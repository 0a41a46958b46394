/**
 * A configuration the user gave that cannot work (sizes, counts, combinations). Its message
 * is one line saying what is wrong and what to do.
 */
export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}
