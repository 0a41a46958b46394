/**
 * Interrupts from a vhost-user back end: each queue's "call" eventfd, which the back end
 * (virtiofsd) writes when it has answered, bound by KVM irqfd to a GSI that
 * KVM_SET_GSI_ROUTING routes to the queue's MSI-X message. The guest is interrupted
 * without any thread of tskvm in the path.
 *
 * That is only right while the transport would send the message at once: MSI-X enabled,
 * neither the function nor the vector masked, a vector assigned. Otherwise (INTx, a masked
 * vector whose pending bit must be kept, no vector) the queue's irqfd is unbound, the
 * eventfd keeps counting, and the device model relays it through the transport. KVM
 * delivers an event that is already counted when an irqfd is bound, so nothing is lost
 * when a vector is unmasked again. route() is called on activation and whenever the driver
 * touches the MSI-X setup (the transport's msixChanged hook pokes the I/O worker); between
 * the guest's write and that call, an interrupt can still take the old way (as on hardware
 * that has not yet latched the new message).
 */
import type { Vm } from "../kvm/kvm";
import type { MsiRoutes } from "../kvm/gsi-routing";
import type { VirtioPciDeviceSide } from "../devices/virtio/pci-device-side";
import type { CallRouter } from "../host/vhost-user/fs-backend";

export class VhostIrqRouter implements CallRouter {
  /** Per queue: the GSI routed for it (kept while the device lives) and whether its irqfd is bound. */
  private readonly gsis: (number | undefined)[];
  private readonly bound: boolean[];

  constructor(
    private readonly vm: Vm,
    private readonly routes: MsiRoutes,
    private readonly transport: VirtioPciDeviceSide,
    private readonly callFds: readonly number[],
  ) {
    this.gsis = callFds.map(() => undefined);
    this.bound = callFds.map(() => false);
  }

  route(): boolean[] {
    return this.callFds.map((fd, q) => {
      const m = this.transport.queueDirectMessage(q);
      if (m === undefined) {
        this.unbind(q);
        return false;
      }
      const message = { address: BigInt(m.address), data: m.data };
      let gsi = this.gsis[q];
      if (gsi === undefined) gsi = this.gsis[q] = this.routes.add(message);
      else this.routes.update(gsi, message);
      if (!this.bound[q]) {
        this.vm.assignIrqfd(fd, gsi);
        this.bound[q] = true;
      }
      return true;
    });
  }

  unroute(): void {
    this.callFds.forEach((_fd, q) => {
      this.unbind(q);
      const gsi = this.gsis[q];
      if (gsi !== undefined) {
        this.routes.remove(gsi);
        this.gsis[q] = undefined;
      }
    });
  }

  private unbind(q: number): void {
    if (!this.bound[q]) return;
    this.vm.deassignIrqfd(this.callFds[q]!, this.gsis[q]!);
    this.bound[q] = false;
  }
}
