/**
 * The tskvm guest agent's protocol, and the host side of the multiplexed output pipe.
 *
 * Four UARTs, four jobs (docs/api.md):
 *
 *   COM1 ttyS0  the kernel's console (and the console shell)     host tag 0
 *   COM2 ttyS1  the agent's control channel, both directions      host tag 1
 *   COM3 ttyS2  the running command's stdout                      host tag 2
 *   COM4 ttyS3  the running command's stderr                      host tag 3
 *
 * Each UART's output reaches one host pipe as [tag, byte] pairs (see SerialSinkSpec), so
 * the bytes of the four ports arrive in the order the guest sent them. Program output never
 * travels on COM2 and the kernel never writes to COM2..COM4, so control messages cannot be
 * confused with a command's output, and the kernel's messages never mix with it.
 *
 * Control channel lines ("\n"-terminated):
 *   host -> guest   RUN <id> <command as a $'...' string>
 *                   POWEROFF
 *   guest -> host   TSKVM-CTL READY nproc=<n>[ unmounted=<tag>,...]
 *                   TSKVM-CTL START <id>
 *                   TSKVM-CTL EXIT <id> <status>
 */

/** Host-side tags of the four UARTs' output on the shared pipe. */
export const Channel = { CONSOLE: 0, CONTROL: 1, STDOUT: 2, STDERR: 3 } as const;
export type ChannelTag = (typeof Channel)[keyof typeof Channel];

/** The kernel command-line argument that starts the agent in the default guest's /init. */
export const AGENT_CMDLINE_ARG = "tskvm.agent=1";

/** The longest command (in bytes, UTF-8) the agent accepts: sh -c's argument must fit MAX_ARG_STRLEN. */
export const MAX_COMMAND_BYTES = 100_000;

export type ControlMessage =
  | { type: "ready"; nproc: number; unmounted: string[] }
  | { type: "start"; id: number }
  | { type: "exit"; id: number; status: number };

/** A control line from the guest, or undefined when it is not one (noise on the port). */
export function parseControlLine(line: string): ControlMessage | undefined {
  const m = /^TSKVM-CTL (READY|START|EXIT)(?: (.*))?$/.exec(line.replace(/\r$/, ""));
  if (m === null) return undefined;
  const args = (m[2] ?? "").split(" ").filter((a) => a !== "");
  const int = (s: string | undefined) => (s !== undefined && /^\d{1,10}$/.test(s) ? Number(s) : undefined);
  switch (m[1]) {
    case "READY": {
      const nproc = int(/^nproc=(\d+)$/.exec(args[0] ?? "")?.[1]);
      // Shares the default guest's /init could not mount (virtio-fs), by tag.
      const unmounted = /^unmounted=([A-Za-z0-9._,-]+)$/.exec(args[1] ?? "")?.[1]?.split(",").filter((t) => t !== "") ?? [];
      return nproc === undefined ? undefined : { type: "ready", nproc, unmounted };
    }
    case "START": {
      const id = int(args[0]);
      return id === undefined ? undefined : { type: "start", id };
    }
    default: {
      const id = int(args[0]);
      const status = int(args[1]);
      return id === undefined || status === undefined || status > 255 ? undefined : { type: "exit", id, status };
    }
  }
}

/**
 * A string as busybox ash's $'...' quoting, which the agent evaluates: printable ASCII stays,
 * except \ and ', which are escaped; every other byte (controls, DEL, UTF-8) becomes \xHH. The
 * result has no newline and no byte outside printable ASCII, so it fits on one protocol line.
 */
export function shellAnsiQuote(text: string): string {
  const bytes = Buffer.from(text, "utf8");
  let out = "$'";
  for (const b of bytes) {
    if (b === 0) throw new RangeError("a command cannot contain a NUL byte");
    if (b === 0x5c) out += "\\\\";
    else if (b === 0x27) out += "\\'";
    else if (b >= 0x20 && b < 0x7f) out += String.fromCharCode(b);
    else out += `\\x${b.toString(16).padStart(2, "0")}`;
  }
  return `${out}'`;
}

/** One argument quoted for sh: 'it'\''s' style, bare when it needs no quoting. */
export function shellQuote(arg: string): string {
  if (arg !== "" && /^[A-Za-z0-9_@%+=:,./-]+$/.test(arg)) return arg;
  return `'${arg.replace(/'/g, `'\\''`)}'`;
}

/**
 * The shell command line for a command given as one string (a shell command line, as is) or
 * as an argument vector (each argument quoted, so `["sh", "-c", "exit 3"]` means exactly that).
 */
export function commandLine(command: string | readonly string[]): string {
  if (typeof command === "string") return command;
  if (command.length === 0) throw new RangeError("an empty command: give a program to run");
  return command.map(shellQuote).join(" ");
}

/** The RUN request for the agent, newline included. */
export function runRequest(id: number, command: string): string {
  if (command.trim() === "") throw new RangeError("an empty command: give a program to run");
  const size = Buffer.byteLength(command, "utf8");
  if (size > MAX_COMMAND_BYTES) throw new RangeError(`the command is ${size} bytes; the guest agent takes at most ${MAX_COMMAND_BYTES}`);
  return `RUN ${id} ${shellAnsiQuote(command)}\n`;
}

export const POWEROFF_REQUEST = "POWEROFF\n";

/**
 * Splits the shared output pipe's [tag, byte] pairs back into the four streams. Stateful:
 * a pair may be split across reads. Consecutive bytes of one channel are delivered together.
 */
export class ChannelDemux {
  private pendingTag: number | undefined;

  constructor(private readonly deliver: (tag: number, bytes: Buffer) => void) {}

  push(chunk: Uint8Array): void {
    let i = 0;
    let runTag = -1;
    let run: number[] = [];
    const flush = () => {
      if (run.length > 0) this.deliver(runTag, Buffer.from(run));
      run = [];
    };
    if (this.pendingTag !== undefined && chunk.byteLength > 0) {
      runTag = this.pendingTag;
      run.push(chunk[0]!);
      this.pendingTag = undefined;
      i = 1;
    }
    for (; i + 1 < chunk.byteLength; i += 2) {
      const tag = chunk[i]!;
      if (tag !== runTag) {
        flush();
        runTag = tag;
      }
      run.push(chunk[i + 1]!);
    }
    flush();
    if (i < chunk.byteLength) this.pendingTag = chunk[i]!;
  }
}

/** Splits a byte stream into lines ("\n"), keeping an unfinished line for the next chunk. */
export class LineSplitter {
  private partial = "";

  constructor(private readonly onLine: (line: string) => void, private readonly maxLine = 4096) {}

  push(bytes: Buffer): void {
    let text = this.partial + bytes.toString("latin1");
    let nl: number;
    while ((nl = text.indexOf("\n")) >= 0) {
      this.onLine(text.slice(0, nl));
      text = text.slice(nl + 1);
    }
    // A runaway line without a newline is noise: keep only its tail.
    this.partial = text.length > this.maxLine ? text.slice(-this.maxLine) : text;
  }
}

// ---- snapshots: what the agent runs around one (docs/snapshot.md) ----

/** The guest's name of disk `index`: vda, vdb, ... (the order the machine attaches them). */
export function diskName(index: number): string {
  return `vd${String.fromCharCode(0x61 + index)}`;
}

/**
 * Before a snapshot whose disks are per-run input: write out what is dirty, drop the page
 * cache and every unmounted disk's buffers, so the guest holds no block of any disk it does
 * not use; print "mounted vdX" for each disk in use (mounted, or a partition of it), which
 * must then stay as it is.
 */
export const SNAPSHOT_PREPARE_COMMAND = [
  "sync",
  "echo 3 > /proc/sys/vm/drop_caches",
  'for d in /sys/block/vd*; do [ -e "$d" ] || continue; n=${d##*/}; if grep -q "^/dev/$n" /proc/mounts; then echo "mounted $n"; else blockdev --flushbufs /dev/$n; fi; done',
].join("; ");

/** The disk indexes SNAPSHOT_PREPARE_COMMAND reported in use. */
export function mountedDisks(stdout: string): Set<number> {
  const out = new Set<number>();
  for (const m of stdout.matchAll(/^mounted vd([a-z])$/gm)) out.add(m[1]!.charCodeAt(0) - 0x61);
  return out;
}

/** Polls (10 ms apart) for a resized disk's new size before giving up; the interrupt normally takes far less. */
const RESIZE_POLLS = 500;

/**
 * A restored guest on a fresh passt: connections of before are gone, and passt learns the
 * guest's MAC from the first frame the guest sends (until then it could only broadcast, and
 * the guest's TCP would drop what arrives). One ping to the gateway, not waited for, sends
 * such a frame at once (what QEMU's announce after a migration does with ARP).
 */
export const NETWORK_NUDGE_COMMAND =
  'gw=$(ip route show default 2>/dev/null | awk \'{print $3; exit}\'); [ -z "$gw" ] || (ping -c 1 -W 1 "$gw" >/dev/null 2>&1 &)';

/** The line the restore's command prints for a share it could not mount. */
const UNMOUNTED_MARK = "tskvm-unmounted";

/**
 * After a restore: set the guest's wall clock to the host's (its monotonic clocks went on
 * from the snapshot); for each per-run disk wait until the guest has read its capacity
 * (a resized image raises a configuration interrupt) and read its partition table again;
 * mount each share (`mounts`: its tag and the command that mounts it), printing
 * "tskvm-unmounted TAG" for one that fails (unmountedShares reads them); nudge the network.
 */
export function restorePrepareCommand(
  epochSeconds: number,
  disks: readonly { index: number; sectors: number }[],
  extra: { mounts?: readonly { tag: string; command: string }[]; nudgeNetwork?: boolean } = {},
): string {
  const parts = [`date -u -s @${Math.round(epochSeconds)} >/dev/null`];
  for (const d of disks) {
    const n = diskName(d.index);
    parts.push(`i=0; while [ "$(cat /sys/block/${n}/size)" != ${d.sectors} ] && [ $i -lt ${RESIZE_POLLS} ]; do usleep 10000; i=$((i+1)); done`);
    parts.push(`blockdev --rereadpt /dev/${n} 2>/dev/null`);
  }
  for (const m of extra.mounts ?? []) parts.push(`{ ${m.command}; } >/dev/null 2>&1 || echo ${UNMOUNTED_MARK} ${m.tag}`);
  if (extra.nudgeNetwork === true) parts.push(NETWORK_NUDGE_COMMAND);
  parts.push("true");
  return parts.join("; ");
}

/** The tags restorePrepareCommand's output says it could not mount. */
export function unmountedShares(stdout: string): string[] {
  return [...stdout.matchAll(new RegExp(`^${UNMOUNTED_MARK} (\\S+)$`, "gm"))].map((m) => m[1]!);
}
