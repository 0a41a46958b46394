/**
 * Run one benchmark module on its own (`node dist/scripts/bench-blk.js --seconds 2`):
 * numeric flags become options, the result is printed formatted and as JSON.
 */
export function runStandalone<O extends object, R>(
  name: string,
  flags: Record<string, NoInfer<keyof O>>,
  bench: (options?: O) => Promise<R>,
  format: (result: R) => string,
): void {
  const args = process.argv.slice(2);
  const options = {} as O;
  for (const [flag, key] of Object.entries(flags)) {
    const i = args.indexOf(flag);
    if (i >= 0) (options as Record<keyof O, number>)[key] = Number(args[i + 1]);
  }
  bench(options).then(
    (r) => {
      console.log(format(r));
      console.log(JSON.stringify(r));
    },
    (e: Error) => {
      console.error(`${name}: ${e.message}`);
      process.exit(1);
    },
  );
}
