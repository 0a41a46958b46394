/**
 * QEMU's -cpu for the same guest-visible CPU as tskvm's emulated template (docs/guest.md),
 * for benchmarks that boot the same guest under both on kvm-pvm. Without
 * -arch-capabilities QEMU 7.2 aborts on a kvm-pvm host that refuses to set MSR 0x10a
 * ("failed to set MSR 0x10a"); tskvm never sets that MSR either.
 */
export const QEMU_EMULATED_CPU =
  "host,-cx16,-xsave,-popcnt,-smap,-pcid,-rdrand,-fsgsbase,-smep,-invpcid,-rdseed,-clflushopt,-clwb,-erms,-fsrm," +
  "kvm-pv-ipi=off,kvm-pv-sched-yield=off,kvm-pv-unhalt=off,-arch-capabilities";
