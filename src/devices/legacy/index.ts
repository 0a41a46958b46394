/** The legacy PC devices: COM1 UART, CMOS/RTC, i8042 (+ port 0x61) and the quiet ports. */
export * from "./serial";
export * from "./cmos";
export * from "./i8042";
export * from "./legacy-ports";
export { adoptState, type StateLike } from "./state-like";
export * from "./pvpanic";
