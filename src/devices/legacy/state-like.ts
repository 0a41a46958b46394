/**
 * How a legacy device finds its shared register state in any thread.
 *
 * The main thread calls `Device.createState()` once; the result (or just its buffer) is
 * posted to every vCPU worker, and each thread wraps it in its own device object. Posting a
 * SharedState through postMessage loses its prototype but keeps `buffer` (the same
 * SharedArrayBuffer), so a device accepts any of the three shapes and rebuilds the wrapper.
 */
import { SharedState } from "../shared-state";

export type StateLike = SharedState | SharedArrayBuffer | { readonly buffer: SharedArrayBuffer };

/** Wrap `state` as a SharedState of `cellCount` cells plus `extraBytes`, checking its size. */
export function adoptState(state: StateLike, cellCount: number, extraBytes: number, who: string): SharedState {
  const buffer = state instanceof SharedArrayBuffer ? state : state.buffer;
  if (!(buffer instanceof SharedArrayBuffer)) {
    throw new TypeError(`${who}: state must be a SharedState or a SharedArrayBuffer`);
  }
  const expected = 4 * (cellCount + 1) + extraBytes;
  if (buffer.byteLength !== expected) {
    throw new RangeError(`${who}: state buffer is ${buffer.byteLength} bytes, expected ${expected}`);
  }
  if (state instanceof SharedState && state.cellCount === cellCount) return state;
  return new SharedState(buffer, cellCount);
}
