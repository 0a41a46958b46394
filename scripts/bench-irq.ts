/**
 * MSI injection: what it costs a device thread to raise an MSI, through an irqfd on a GSI
 * routed to the message (KVM_SET_GSI_ROUTING; one write(2) of an eventfd, which is also how
 * virtiofsd interrupts the guest) versus KVM_SIGNAL_MSI (one ioctl per interrupt), into a
 * tiny guest that takes each interrupt (test/helpers/msi-guest.ts).
 *
 *   per call      ns per injection, back to back (the guest takes what it can; coalesced
 *                 interrupts are counted as delivered ones below)
 *   round trip    inject, then wait until the guest's handler has run: median us
 *
 * Run alone: node dist/scripts/bench-irq.js [--calls N] [--trips N]
 */
import * as sys from "../src/sys/libc";
import { Machine } from "../src/vmm/machine";
import { GsiRoutingTable } from "../src/kvm/gsi-routing";
import { COUNTER_ADDRESS, LOAD_ADDRESS, MSI_TO_CPU0, msiCountingGuest } from "../test/helpers/msi-guest";
import { runStandalone } from "./lib/standalone";

export interface IrqBenchOptions {
  calls?: number;
  trips?: number;
}

export interface IrqMethodResult {
  nsPerCall: number;
  delivered: number;
  roundTripUs: number;
}

export interface IrqBenchResult {
  irqfd: IrqMethodResult;
  signalMsi: IrqMethodResult;
  /** signalMsi.nsPerCall / irqfd.nsPerCall: above 1, irqfd is cheaper. */
  callCostRatio: number;
}

const one = new Uint8Array(new BigUint64Array([1n]).buffer);
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

export async function benchIrq(opts: IrqBenchOptions = {}): Promise<IrqBenchResult> {
  const calls = opts.calls ?? 20_000;
  const trips = opts.trips ?? 200;
  const m = Machine.create({
    memoryBytes: 16 * 1024 * 1024,
    cpus: 1,
    consoleFd: 2,
    boot: { kind: "raw", code: msiCountingGuest(), address: LOAD_ADDRESS, mode: "long" },
  });
  const efd = sys.eventfd();
  try {
    const running = m.run();
    await m.allStarted();
    const table = new GsiRoutingTable();
    const gsi = table.allocateMsi(MSI_TO_CPU0);
    m.vm.setGsiRouting(table.encode());
    m.vm.assignIrqfd(efd, gsi);
    const counter = (): number => m.memory.readU32(COUNTER_ADDRESS);
    const methods: Record<"irqfd" | "signalMsi", () => void> = {
      irqfd: () => sys.write(efd, one),
      signalMsi: () => m.vm.signalMsi(Number(MSI_TO_CPU0.address), 0, MSI_TO_CPU0.data),
    };
    // The guest enables its APIC first; until then MSIs are dropped.
    const ready = Date.now() + 60_000;
    while (counter() === 0 && Date.now() < ready) {
      methods.irqfd();
      await new Promise((r) => setTimeout(r, 10));
    }
    if (counter() === 0) throw new Error("the tiny guest never took an interrupt");
    const measure = (raise: () => void): IrqMethodResult => {
      const before = counter();
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < calls; i++) raise();
      const ns = Number(process.hrtime.bigint() - t0) / calls;
      const delivered = counter() - before;
      const rt: number[] = [];
      for (let i = 0; i < trips; i++) {
        const c = counter();
        const s = process.hrtime.bigint();
        raise();
        while (counter() === c) {
          if (Number(process.hrtime.bigint() - s) > 1e9) break;
        }
        rt.push(Number(process.hrtime.bigint() - s) / 1000);
      }
      return { nsPerCall: ns, delivered, roundTripUs: median(rt) };
    };
    // Alternate, three rounds each, and keep the medians.
    const runs: Record<string, IrqMethodResult[]> = { irqfd: [], signalMsi: [] };
    for (let round = 0; round < 3; round++) {
      runs.irqfd!.push(measure(methods.irqfd));
      runs.signalMsi!.push(measure(methods.signalMsi));
    }
    const pick = (rs: IrqMethodResult[]): IrqMethodResult => ({
      nsPerCall: median(rs.map((r) => r.nsPerCall)),
      delivered: median(rs.map((r) => r.delivered)),
      roundTripUs: median(rs.map((r) => r.roundTripUs)),
    });
    m.stop("benchmark done");
    await running;
    const irqfd = pick(runs.irqfd!);
    const signalMsi = pick(runs.signalMsi!);
    return { irqfd, signalMsi, callCostRatio: signalMsi.nsPerCall / irqfd.nsPerCall };
  } finally {
    sys.close(efd);
    m.destroy();
  }
}

export function formatIrqBench(r: IrqBenchResult): string {
  const row = (name: string, x: IrqMethodResult) =>
    `  ${name.padEnd(12)} ${x.nsPerCall.toFixed(0).padStart(7)} ns/call  ${String(x.delivered).padStart(6)} delivered  round trip ${x.roundTripUs.toFixed(1)} us`;
  return [
    "MSI injection into a tiny guest (irqfd on a routed GSI vs. KVM_SIGNAL_MSI)",
    row("irqfd", r.irqfd),
    row("SIGNAL_MSI", r.signalMsi),
    `  SIGNAL_MSI / irqfd cost per call: ${r.callCostRatio.toFixed(2)}`,
  ].join("\n");
}

if (require.main === module) {
  runStandalone<IrqBenchOptions, IrqBenchResult>("bench-irq", { "--calls": "calls", "--trips": "trips" }, benchIrq, formatIrqBench);
}
