/**
 * Runs one virtio device model in the thread that serves its queues (the I/O worker): it
 * watches the transport's shared state for DRIVER_OK and resets, activates or resets the
 * device model accordingly, forwards queue kicks to it, and delivers its interrupts
 * through an InterruptSink (the board's: MSI through KVM_SIGNAL_MSI, INTx through an irqfd
 * whose resample fd tells us when to assert the line again).
 */
import type { GuestMemory } from "../../memory/guest-memory";
import type { VirtioDevice } from "./types";
import type { VirtqueueState } from "./queue";
import type { InterruptDelivery, VirtioPciDeviceSide } from "./pci-transport";

/** How the worker reaches KVM and the interrupt eventfds; faked in tests. */
export interface InterruptSink {
  /** Inject one MSI (KVM_SIGNAL_MSI). */
  msi(address: number, data: number): void;
  /** Assert the device's INTx line (write to its irqfd). */
  intx(): void;
}

export interface DeviceLog {
  warn(message: string): void;
}

export class VirtioDeviceRunner {
  private active = false;
  private generation = -1;
  /** The device model threw: it is set aside until the driver resets the device. */
  private broken = false;
  private interruptFailed = false;

  /**
   * `restored`: the device's queue positions when the VM is restored from a snapshot (the
   * transport's restored registers say whether the driver had it running); used by the
   * first activation only.
   */
  constructor(
    readonly name: string,
    private readonly transport: VirtioPciDeviceSide,
    private readonly device: VirtioDevice,
    private readonly memory: GuestMemory,
    private readonly irq: InterruptSink,
    private readonly log: DeviceLog,
    private restored?: readonly (VirtqueueState | undefined)[],
  ) {}

  /**
   * Bring the device model in line with the driver: activate after DRIVER_OK, reset after the
   * driver reset the device (the transport bumps its reset generation), and tell an active
   * one that the interrupt setup may have changed. Called on every control event and before
   * each kick is handled.
   */
  sync(): void {
    this.contained(() => this.syncNow());
  }

  private syncNow(): void {
    const gen = this.transport.resetGeneration();
    if ((this.active || this.broken) && gen !== this.generation) {
      this.broken = false;
      if (this.active) this.device.reset();
      this.active = false;
    }
    this.generation = gen;
    if (this.broken) return;
    const restored = this.restored;
    this.restored = undefined;
    if (this.active) {
      this.device.transportChanged?.();
      return;
    }
    if (this.transport.driverOk()) {
      this.active = true;
      // Signals carry the generation they were activated in: after a reset the transport
      // drops them, so a late completion cannot interrupt the next driver.
      this.device.activate({
        memory: this.memory,
        features: this.transport.negotiatedFeatures(),
        queues: this.transport.queueConfigs(),
        signalUsed: (q) => this.deliver(this.transport.signalUsed(q, gen)),
        needsReset: (reason) => {
          this.log.warn(`${this.name}: ${reason}; the device needs a reset by its driver`);
          this.deliver(this.transport.setNeedsReset());
        },
        ...(restored !== undefined ? { queueStates: restored } : {}),
        updateConfig: (offset, bytes) => {
          this.transport.updateDeviceConfig(offset, bytes);
          this.deliver(this.transport.signalConfigChange(gen));
        },
      });
      // A kick that was in its eventfd when the snapshot was taken is gone: look at every queue.
      if (restored !== undefined) this.serveAllQueues();
    }
  }

  /**
   * Snapshots: have the device model finish or give back what it has in flight (see
   * VirtioDevice.quiesce). Returns its queue positions, or undefined when the driver has not
   * started the device (nothing to save beyond the transport's registers).
   */
  quiesce(): (VirtqueueState | undefined)[] | undefined {
    if (!this.active) return undefined;
    this.device.quiesce();
    return this.device.queueStates();
  }

  /**
   * The VM goes on after a pause: serve every queue, since chains given back by quiesce()
   * and kicks that came meanwhile wait there.
   */
  resumed(): void {
    if (!this.active) return;
    this.contained(() => {
      this.device.resumed?.();
      this.serveAllQueues();
    });
  }

  private serveAllQueues(): void {
    for (let q = 0; q < this.device.queueCount; q++) this.device.queueNotified(q);
  }

  kicked(queue: number): void {
    this.contained(() => {
      this.syncNow();
      if (this.active) this.device.queueNotified(queue);
    });
  }

  /** The guest EOI'd our level-triggered INTx: assert again if an interrupt is still pending. */
  resampled(): void {
    if (this.transport.isrPending()) this.deliver({ kind: "intx" });
  }

  /** Host fds the device model wants polled now (only while active). */
  pollFds(): readonly { fd: number; events: number }[] {
    return this.active && this.device.pollFds !== undefined ? this.device.pollFds() : [];
  }

  pollReady(fd: number, revents: number): void {
    if (this.active) this.contained(() => this.device.pollReady?.(fd, revents));
  }

  /** VM stop: let the device model finish and its back end flush. */
  stop(): void {
    if (this.active) this.device.reset();
    this.active = false;
  }

  /**
   * Run device-model work so that whatever it throws breaks this device only: it is reset,
   * marked DEVICE_NEEDS_RESET for its driver and left alone until the driver resets it;
   * the I/O worker goes on serving every other device.
   */
  private contained(work: () => void): void {
    try {
      work();
    } catch (e) {
      this.log.warn(`${this.name}: ${(e as Error).message}; the device needs a reset by its driver`);
      this.broken = true;
      if (this.active) {
        this.active = false;
        try {
          this.device.reset();
        } catch {
          // Already failing; the driver's reset starts it afresh.
        }
      }
      this.deliver(this.transport.setNeedsReset());
    }
  }

  /**
   * KVM_SIGNAL_MSI fails for a message no CPU answers (an address the guest made up), an
   * eventfd write for a counter at its limit: the interrupt is lost, which is the guest's
   * doing, and the device goes on. Said once per device.
   */
  private deliver(d: InterruptDelivery): void {
    try {
      if (d.kind === "msix") this.irq.msi(d.address, d.data);
      else if (d.kind === "intx") this.irq.intx();
    } catch (e) {
      if (this.interruptFailed) return;
      this.interruptFailed = true;
      this.log.warn(`${this.name}: an interrupt could not be delivered (${(e as Error).message}); the device carries on`);
    }
  }
}
