/**
 * The host side of the serial console: the user's stdin goes to the guest's UART, with
 * QEMU's and gokvm's escape key: Ctrl-A x quits, Ctrl-A p pauses or resumes the VM,
 * Ctrl-A Ctrl-A sends a literal Ctrl-A, Ctrl-A h prints help. A terminal is put in raw mode and restored on every exit path.
 */
import type { ReadStream } from "node:tty";

export const ESCAPE_BYTE = 0x01; // Ctrl-A

export type EscapeAction = "quit" | "help" | "dump" | "pause";

/**
 * Splits input into bytes for the guest and escape commands. Stateful across chunks: a
 * Ctrl-A at the end of one read pairs with the first byte of the next.
 */
export class EscapeParser {
  private pendingEscape = false;

  /** Returns the bytes to forward and the actions found, in order of appearance. */
  feed(chunk: Uint8Array): { forward: Uint8Array; actions: EscapeAction[] } {
    const out: number[] = [];
    const actions: EscapeAction[] = [];
    for (const b of chunk) {
      if (this.pendingEscape) {
        this.pendingEscape = false;
        if (b === 0x78 /* x */ || b === 0x58) actions.push("quit");
        else if (b === 0x68 /* h */ || b === 0x3f) actions.push("help");
        else if (b === 0x64 /* d */) actions.push("dump");
        else if (b === 0x70 /* p */) actions.push("pause");
        else if (b === ESCAPE_BYTE) out.push(ESCAPE_BYTE);
        // Any other key after Ctrl-A is dropped, as QEMU does.
        if (actions[actions.length - 1] === "quit") break;
      } else if (b === ESCAPE_BYTE) {
        this.pendingEscape = true;
      } else {
        out.push(b);
      }
    }
    return { forward: Uint8Array.from(out), actions };
  }
}

export const ESCAPE_HELP =
  "\r\ntskvm console keys:\r\n  Ctrl-A x    quit (stop the VM)\r\n  Ctrl-A p    pause the VM, or resume it\r\n  Ctrl-A h    this help\r\n  Ctrl-A d    print every vCPU's registers (where is the guest?)\r\n  Ctrl-A Ctrl-A  send Ctrl-A to the guest\r\n";

export interface ConsoleAttachment {
  /** Stop reading and give the terminal back as it was. Safe to call more than once. */
  detach(): void;
}

/**
 * Read `input` (usually process.stdin) and hand the guest's bytes to `send`. In raw mode on
 * a terminal, so keys reach the guest as typed; restored by detach() and, as a last resort,
 * on process exit.
 */
export function attachConsole(
  input: NodeJS.ReadStream,
  send: (bytes: Uint8Array) => void,
  onAction: (action: EscapeAction) => void,
): ConsoleAttachment {
  const parser = new EscapeParser();
  const tty = input.isTTY ? (input as unknown as ReadStream) : undefined;
  const wasRaw = tty?.isRaw ?? false;
  if (tty !== undefined) tty.setRawMode(true);
  const restore = () => {
    if (tty !== undefined && tty.isRaw !== wasRaw) tty.setRawMode(wasRaw);
  };
  process.on("exit", restore);
  const onData = (chunk: Buffer) => {
    const { forward, actions } = parser.feed(chunk);
    if (forward.byteLength > 0) send(forward);
    for (const a of actions) onAction(a);
  };
  // End of input (a pipe closed, /dev/null) is not a reason to stop the guest.
  const onError = () => undefined;
  input.on("data", onData);
  input.on("error", onError);
  input.resume();
  let attached = true;
  return {
    detach() {
      if (!attached) return;
      attached = false;
      input.off("data", onData);
      input.off("error", onError);
      input.pause();
      restore();
      process.off("exit", restore);
      // Let the process end even though stdin was read.
      (input as { unref?: () => void }).unref?.();
    },
  };
}
