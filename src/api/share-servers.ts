/**
 * The virtiofsd processes behind a VM's shares: started (one per share, plus one for the
 * host's root file system with rootfs "host") before the machine is built, watched while
 * it runs, stopped after it is destroyed. Nothing they use outlives the VM: their sockets
 * were unlinked when connected, the runtime directory is removed once they have started,
 * and each virtiofsd exits when its connection closes (also when tskvm is killed).
 */
import { type RuntimeDir, createRuntimeDir, describeExit } from "../host/helper-process";
import { type Virtiofsd, startVirtiofsd } from "../host/virtiofsd";
import type { ShareConfig } from "../vmm/machine";
import { ROOTFS_TAG, type Share } from "./shares";

export class ShareServers {
  private stopping = false;

  private constructor(
    private readonly servers: readonly { share: Share; daemon: Virtiofsd }[],
  ) {}

  /**
   * Start virtiofsd for each share (and for the host's root file system, read-only, when
   * `rootfsHost`). On any failure, stops those already started and throws (VirtiofsdError
   * with one line, or whatever went wrong).
   */
  static async start(shares: readonly Share[], rootfsHost: boolean): Promise<ShareServers> {
    const all: Share[] = [...shares];
    if (rootfsHost) all.unshift({ hostPath: "/", tag: ROOTFS_TAG, readOnly: true });
    const started: { share: Share; daemon: Virtiofsd }[] = [];
    if (all.length === 0) return new ShareServers(started);
    let runtime: RuntimeDir | undefined;
    try {
      runtime = createRuntimeDir("virtiofsd");
      for (const [index, share] of all.entries()) {
        // The host's root changes little while a guest runs: long caches save many
        // round trips (a program's start looks up dozens of absent files).
        const cache = share.tag === ROOTFS_TAG ? "always" : "auto";
        started.push({ share, daemon: await startVirtiofsd(share, { runtimeDir: runtime.path, index, cache }) });
      }
      return new ShareServers(started);
    } catch (e) {
      await Promise.all(started.map((s) => s.daemon.stop()));
      throw e;
    } finally {
      // Every socket was unlinked as soon as it was connected: nothing in it is needed.
      runtime?.remove();
    }
  }

  /** What the machine needs for each virtio-fs device. */
  get configs(): ShareConfig[] {
    return this.servers.map(({ share, daemon }) => ({
      tag: share.tag,
      name: daemon.process.name,
      connFd: daemon.frontend.channel.fd,
      backend: daemon.backend,
    }));
  }

  /**
   * Call `report` (one line) when a virtiofsd ends while the VM still needs it: the guest
   * then gets I/O errors on that share (the device takes its queues over) and the VM runs on.
   */
  watch(report: (message: string) => void): void {
    for (const { share, daemon } of this.servers) {
      void daemon.process.exited.then((exit) => {
        if (this.stopping || exit.expected) return;
        const what = share.tag === ROOTFS_TAG ? "the host's root file system" : `share ${share.tag} (${share.hostPath})`;
        report(`virtiofsd for ${what} ${describeExit(exit)}; the guest now gets I/O errors there`);
      });
    }
  }

  /** Close every connection (each virtiofsd then exits) and make sure they are gone. */
  async stop(): Promise<void> {
    this.stopping = true;
    await Promise.all(this.servers.map((s) => s.daemon.stop()));
  }
}
