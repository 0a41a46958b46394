/**
 * Virtio-pci functions as plain data, and what each thread makes of one.
 *
 * The machine (main thread) opens the host resources (disk image, TAP; passt's socket comes
 * from the API), allocates each function's shared transport state and eventfds, and writes
 * it all into one VirtioFunctionSpec, posted as it is to every worker:
 * - vCPU threads (and the main thread) put the register side on the PCI bus
 *   (devices.ts: instantiateDevices, VirtioPciTransport);
 * - the I/O worker builds the device model over its host back end and runs it
 *   (instantiateIoSide: VirtioDeviceRunner, VirtioBlock over a FileBlockEngine,
 *   VirtioNet over a Tap or a StreamNetBackend (passt), VirtioFs over a vhost-user
 *   connection to virtiofsd, whose queues virtiofsd serves itself: the worker polls none
 *   of its kicks; VirtioRng over the host's getrandom).
 * A device's identity (type, queues, features, config space) comes from its spec alone
 * (describeVirtioDevice), so no thread builds a back end just to learn it.
 */
import * as sys from "../sys/libc";
import { Vm } from "../kvm/kvm";
import type { GuestMemory } from "../memory/guest-memory";
import type { PciSlot } from "../devices/pci/types";
import { VirtioPciDeviceSide } from "../devices/virtio/pci-device-side";
import type { VirtioPciState } from "../devices/virtio/transport-state";
import type { VirtioDevice, VirtioDeviceDescription } from "../devices/virtio/types";
import { VirtioDeviceRunner, type DeviceLog, type InterruptSink } from "../devices/virtio/runner";
import type { VirtqueueState } from "../devices/virtio/queue";
import { VirtioBlock, blkDescription } from "../devices/virtio/blk/device";
import { VirtioNet, netDescription } from "../devices/virtio/net/device";
import { VirtioFs, fsDescription } from "../devices/virtio/fs/device";
import { VirtioRng, rngDescription } from "../devices/virtio/rng/device";
import { hostEntropy } from "../host/entropy";
import { FileBlockEngine } from "../host/block-file-engine";
import { BLOCK_RING_ENTRIES, UringBlockEngine } from "../host/block-uring-engine";
import type { IoEngineName } from "../host/io-engine";
import type { BlockBackend } from "../devices/virtio/blk/backend";
import { IoUring } from "../sys/io-uring";
import { TX_BATCH } from "../devices/virtio/net/tx";
import { Tap } from "../host/tap";
import { VhostUserFsBackend, type VhostUserFsSpec } from "../host/vhost-user/fs-backend";
import type { MsiRoutes } from "../kvm/gsi-routing";
import { VhostIrqRouter } from "./vhost-irq";
import { StreamNetBackend } from "../host/stream-backend";

/** An open disk image, as plain data (the fd is valid in every thread of the process). */
export interface DiskSpec {
  fd: number;
  sizeBytes: number;
  readOnly: boolean;
  path: string;
  serial: string;
  /** io_uring: a queue drain per io_uring_enter; sync: pread/pwrite per request (host/io-engine.ts). */
  engine: IoEngineName;
}

/**
 * A NIC's back end, as plain data; its fd stays owned (and closed) by the main thread:
 * an open TAP, or a connected `-netdev stream` socket (passt's).
 */
export type NicBackendSpec =
  | { kind: "tap"; fd: number; name: string; created: boolean }
  | {
      kind: "stream";
      fd: number;
      /** For messages: "passt". */
      name: string;
      /** Its owner reports its loss (passt's exit) itself. */
      reportsOwnLoss: boolean;
    };

export interface NicSpec {
  backend: NicBackendSpec;
  mac: Uint8Array;
  /** Whether the back end takes the offloads (probed once, on the main thread). */
  offloads: boolean;
  /** io_uring: runs of frames per io_uring_enter; sync: read/write per frame. */
  engine: IoEngineName;
}

/** A share: the virtio-fs tag, and virtiofsd's connection with what it needs (plain data). */
export interface FsSpec extends VhostUserFsSpec {
  tag: string;
}

/** What a virtio device is made of. */
export type VirtioDeviceSpec =
  | { kind: "virtio-blk"; disk: DiskSpec }
  | { kind: "virtio-net"; nic: NicSpec }
  | { kind: "virtio-fs"; fs: FsSpec }
  | { kind: "virtio-rng" };

/** One virtio-pci function, as every thread needs it. Plain data, safe for postMessage. */
export interface VirtioFunctionSpec {
  /** For messages: "virtio-blk vda (disk.img)". */
  name: string;
  slot: PciSlot;
  device: VirtioDeviceSpec;
  /** The transport's registers, shared by every thread (transport-state.ts). */
  transport: VirtioPciState;
  /**
   * One eventfd per queue: KVM signals it through ioeventfd when the driver kicks, and a
   * kick that arrives as an exit is written to it too. Whoever serves the queues polls it.
   */
  kickFds: number[];
  /** irqfd for the INTx line, and the eventfd KVM signals when the guest EOIs it. */
  intxFd: number;
  resampleFd: number;
}

/** The device's identity, features and configuration space, from its spec alone. */
export function describeVirtioDevice(spec: VirtioDeviceSpec): VirtioDeviceDescription {
  switch (spec.kind) {
    case "virtio-blk":
      return blkDescription(spec.disk);
    case "virtio-net":
      return netDescription({ mac: spec.nic.mac, offloads: spec.nic.offloads, validChecksums: validChecksums(spec.nic) });
    case "virtio-fs":
      return fsDescription({ tag: spec.fs.tag, backendFeatures: spec.fs.backend.features });
    case "virtio-rng":
      return rngDescription();
  }
}

/** What the I/O worker gives every function it brings to life. */
export interface IoSideEnv {
  memory: GuestMemory;
  vmFd: number;
  log: DeviceLog;
  /** The VM's MSI routes, owned by the I/O worker (vhost-user interrupts). */
  msiRoutes: MsiRoutes;
  /** Queue positions from a snapshot, by queue (restore). */
  restored?: readonly (VirtqueueState | undefined)[] | undefined;
}

/**
 * The device model over its host back end, in the thread that serves its queues, and how
 * to let go of what the back end holds (an io_uring ring) when that thread ends.
 */
export function createVirtioDevice(spec: VirtioFunctionSpec, env: IoSideEnv, transport: VirtioPciDeviceSide): { device: VirtioDevice; close(): void } {
  const log = (line: string) => env.log.warn(`${spec.name}: ${line}`);
  const device = spec.device;
  switch (device.kind) {
    case "virtio-blk": {
      const engine = blockEngine(device.disk, log);
      return { device: new VirtioBlock(engine, { serial: device.disk.serial, log }), close: () => (engine as Partial<UringBlockEngine>).close?.() };
    }
    case "virtio-net": {
      // A second handle on the main thread's fd: never closed from here.
      const b = device.nic.backend;
      let ring: IoUring | undefined;
      let backend: Tap | StreamNetBackend;
      if (b.kind === "tap") {
        const tap = new Tap(b.name, b.fd, b.created, 12);
        if (device.nic.engine === "io_uring") {
          try {
            ring = IoUring.create(TX_BATCH);
            tap.useRing(ring);
          } catch (e) {
            log(`io_uring unusable in the I/O worker (${(e as Error).message}); the TAP uses writev per frame`);
          }
        }
        backend = tap;
      } else {
        backend = new StreamNetBackend(b.fd, b.name, { reportsOwnLoss: b.reportsOwnLoss });
      }
      const net = new VirtioNet(backend, { mac: device.nic.mac, offloads: device.nic.offloads, validChecksums: validChecksums(device.nic), log });
      return { device: net, close: () => ring?.close() };
    }
    case "virtio-fs": {
      const router = new VhostIrqRouter(new Vm(env.vmFd), env.msiRoutes, transport, device.fs.callFds);
      const backend = new VhostUserFsBackend(device.fs, spec.kickFds, env.memory, router);
      return { device: new VirtioFs(backend, { tag: device.fs.tag, backendFeatures: device.fs.backend.features, log }), close: () => undefined };
    }
    case "virtio-rng":
      return { device: new VirtioRng(hostEntropy, { log }), close: () => undefined };
  }
}

/** passt builds every frame it sends with complete checksums (StreamNetBackend.validChecksums). */
function validChecksums(nic: NicSpec): boolean {
  return nic.backend.kind === "stream";
}

/**
 * The disk's engine. io_uring's ring is made here, in the I/O worker (a ring belongs to
 * the thread that made it); should that fail although the main thread's probe said yes,
 * the disk runs on the file engine and the log says why.
 */
function blockEngine(disk: DiskSpec, log: (line: string) => void): BlockBackend {
  const file = new FileBlockEngine(disk);
  if (disk.engine !== "io_uring") return file;
  try {
    return new UringBlockEngine(disk, { ring: IoUring.create(BLOCK_RING_ENTRIES), fallback: file });
  } catch (e) {
    log(`io_uring unusable in the I/O worker (${(e as Error).message}); the disk uses pread/pwrite`);
    return file;
  }
}

/** A function as the I/O worker runs it: the fds to poll and what to do when they fire. */
export interface IoSideDevice {
  readonly runner: VirtioDeviceRunner;
  /** Polled for kicks of queue i (index i); none for a device whose queues another process serves. */
  readonly kickFds: readonly number[];
  readonly resampleFd: number;
  /** Release what the back end holds in this thread (after runner.stop()). */
  close(): void;
}

/** Bring a function to life in the I/O worker: its device model, runner and interrupt sink. */
export function instantiateIoSide(spec: VirtioFunctionSpec, env: IoSideEnv): IoSideDevice {
  const vm = new Vm(env.vmFd);
  const irq: InterruptSink = {
    msi: (address, data) => vm.signalMsi(address >>> 0, (address / 0x1_0000_0000) >>> 0, data),
    intx: () => sys.signalEventfd(spec.intxFd),
  };
  const transport = new VirtioPciDeviceSide(spec.transport);
  const { device, close } = createVirtioDevice(spec, env, transport);
  const runner = new VirtioDeviceRunner(spec.name, transport, device, env.memory, irq, env.log, env.restored);
  // virtiofsd reads a share's kicks itself (the device model polls them only if it dies).
  const kickFds = spec.device.kind === "virtio-fs" ? [] : spec.kickFds;
  return { runner, kickFds, resampleFd: spec.resampleFd, close };
}
