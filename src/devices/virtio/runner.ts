/**
 * Runs one virtio device model in the thread that serves its queues (the I/O worker): it
 * watches the transport's shared state for DRIVER_OK and resets, activates or resets the
 * device model accordingly, forwards queue kicks to it, and delivers its interrupts
 * through an InterruptSink (the board's: MSI through KVM_SIGNAL_MSI, INTx through an irqfd
 * whose resample fd tells us when to assert the line again).
 */
import type { GuestMemory } from "../../memory/guest-memory";
import type { VirtioDevice } from "./types";
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

  constructor(
    readonly name: string,
    private readonly transport: VirtioPciDeviceSide,
    private readonly device: VirtioDevice,
    private readonly memory: GuestMemory,
    private readonly irq: InterruptSink,
    private readonly log: DeviceLog,
  ) {}

  /**
   * Bring the device model in line with the driver: activate after DRIVER_OK, reset after the
   * driver reset the device (the transport bumps its reset generation). Called on every
   * control event and before each kick is handled.
   */
  sync(): void {
    const gen = this.transport.resetGeneration();
    if (this.active && gen !== this.generation) {
      this.device.reset();
      this.active = false;
    }
    this.generation = gen;
    if (!this.active && this.transport.driverOk()) {
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
        updateConfig: (offset, bytes) => {
          this.transport.updateDeviceConfig(offset, bytes);
          this.deliver(this.transport.signalConfigChange(gen));
        },
      });
    }
  }

  kicked(queue: number): void {
    this.sync();
    if (this.active) this.device.queueNotified(queue);
  }

  /** The guest EOI'd our level-triggered INTx: assert again if an interrupt is still pending. */
  resampled(): void {
    if (this.transport.isrPending()) this.irq.intx();
  }

  /** Host fds the device model wants polled now (only while active). */
  pollFds(): readonly { fd: number; events: number }[] {
    return this.active && this.device.pollFds !== undefined ? this.device.pollFds() : [];
  }

  pollReady(fd: number, revents: number): void {
    if (this.active) this.device.pollReady?.(fd, revents);
  }

  /** VM stop: let the device model finish and its back end flush. */
  stop(): void {
    if (this.active) this.device.reset();
    this.active = false;
  }

  private deliver(d: InterruptDelivery): void {
    if (d.kind === "msix") this.irq.msi(d.address, d.data);
    else if (d.kind === "intx") this.irq.intx();
  }
}
