/**
 * The I/O side of each virtio device: what the machine hands the I/O worker (plain data)
 * and how the worker brings it to life (transport view + back end + interrupt sink).
 */
import * as sys from "../sys/libc";
import { Vm } from "../kvm/kvm";
import type { GuestMemory } from "../memory/guest-memory";
import { VirtioPciDeviceSide } from "../devices/virtio/pci-transport";
import type { VirtioPciState } from "../devices/virtio/transport-state";
import { VirtioBlock } from "../devices/virtio/blk/device";
import { FileBlockEngine } from "../host/block-file-engine";
import { VirtioNet } from "../devices/virtio/net/device";
import { Tap } from "../host/tap";
import type { VirtioDevice } from "../devices/virtio/types";
import { VirtioDeviceRunner, type DeviceLog, type InterruptSink } from "../devices/virtio/runner";

/** An open disk image, as plain data (the fd is valid in every thread of the process). */
export interface DiskSpec {
  fd: number;
  sizeBytes: number;
  readOnly: boolean;
  path: string;
  serial: string;
}

/** An open TAP, as plain data: the fd stays owned (and closed) by the main thread. */
export interface NicSpec {
  tapFd: number;
  tapName: string;
  created: boolean;
  mac: Uint8Array;
  /** Whether the TAP accepted TUNSETOFFLOAD (probed once, on the main thread). */
  offloads: boolean;
}

/** What a back end is made of. */
export type BackendSpec = { kind: "virtio-blk"; disk: DiskSpec } | { kind: "virtio-net"; nic: NicSpec };

export type IoDeviceSpec = BackendSpec & {
  name: string;
  transport: VirtioPciState;
  /** One eventfd per queue: KVM signals it through ioeventfd when the driver kicks. */
  kickFds: number[];
  /** irqfd for the INTx line, and the eventfd KVM signals when the guest EOIs it. */
  intxFd: number;
  resampleFd: number;
};

export interface IoDeviceInstance {
  readonly io: VirtioDeviceRunner;
  readonly kickFds: readonly number[];
  readonly resampleFd: number | undefined;
  close(): void;
}

/** The back end a spec describes; also used on the main thread for the device's identity. */
export function createBackend(spec: BackendSpec, log?: (line: string) => void): VirtioDevice {
  const logOpt = log !== undefined ? { log } : {};
  switch (spec.kind) {
    case "virtio-blk":
      return new VirtioBlock(new FileBlockEngine(spec.disk), { serial: spec.disk.serial, ...logOpt });
    case "virtio-net": {
      // A second handle on the main thread's TAP fd: never closed from here.
      const tap = new Tap(spec.nic.tapName, spec.nic.tapFd, spec.nic.created, 12);
      return new VirtioNet(tap, { mac: spec.nic.mac, offloads: spec.nic.offloads, ...logOpt });
    }
  }
}

export function instantiateIoDevice(
  spec: IoDeviceSpec,
  env: { memory: GuestMemory; vmFd: number; log: DeviceLog },
): IoDeviceInstance {
  const vm = new Vm(env.vmFd);
  const irq: InterruptSink = {
    msi: (address, data) => vm.signalMsi(address % 0x1_0000_0000, Math.floor(address / 0x1_0000_0000), data),
    intx: () => sys.signalEventfd(spec.intxFd),
  };
  const backend = createBackend(spec, (line) => env.log.warn(`${spec.name}: ${line}`));
  const io = new VirtioDeviceRunner(spec.name, new VirtioPciDeviceSide(spec.transport), backend, env.memory, irq, env.log);
  return { io, kickFds: spec.kickFds, resampleFd: spec.resampleFd, close: () => undefined };
}
