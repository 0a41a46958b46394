/** The tskvm package: the TypeScript API (src/api, docs/api.md). */
export * from "./api";
