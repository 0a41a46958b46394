/**
 * struct setup_header (Documentation/arch/x86/boot.rst, arch/x86/include/uapi/asm/bootparam.h).
 * It sits at offset 0x1f1 both in a bzImage file and in struct boot_params (the zero
 * page), so the same offsets read the image and write the zero page.
 */
export const Hdr = {
  SETUP_SECTS: 0x1f1, // u8: 512-byte setup sectors after the boot sector; 0 means 4
  ROOT_FLAGS: 0x1f2, // u16
  SYSSIZE: 0x1f4, // u32: size of the protected-mode code in 16-byte paragraphs
  RAM_SIZE: 0x1f8, // u16: obsolete
  VID_MODE: 0x1fa, // u16
  ROOT_DEV: 0x1fc, // u16
  BOOT_FLAG: 0x1fe, // u16: 0xaa55
  JUMP: 0x200, // u16: a short jmp; its displacement byte (0x201) gives the header's end
  HEADER: 0x202, // u32: "HdrS"
  VERSION: 0x206, // u16: boot protocol version, major << 8 | minor
  REALMODE_SWTCH: 0x208, // u32
  START_SYS_SEG: 0x20c, // u16: obsolete
  KERNEL_VERSION: 0x20e, // u16: pointer to the version string, minus 0x200
  TYPE_OF_LOADER: 0x210, // u8 (write)
  LOADFLAGS: 0x211, // u8 (modify)
  SETUP_MOVE_SIZE: 0x212, // u16
  CODE32_START: 0x214, // u32: 32-bit protected-mode entry (defaults to the load address)
  RAMDISK_IMAGE: 0x218, // u32 (write): initrd address, low 32 bits
  RAMDISK_SIZE: 0x21c, // u32 (write): initrd size, low 32 bits
  BOOTSECT_KLUDGE: 0x220, // u32: obsolete
  HEAP_END_PTR: 0x224, // u16 (write): end of the real-mode setup heap, minus 0x200
  EXT_LOADER_VER: 0x226, // u8
  EXT_LOADER_TYPE: 0x227, // u8
  CMD_LINE_PTR: 0x228, // u32 (write): command line address, low 32 bits
  INITRD_ADDR_MAX: 0x22c, // u32: highest address the initrd may occupy (2.03+)
  KERNEL_ALIGNMENT: 0x230, // u32: physical alignment a relocatable kernel needs (2.05+)
  RELOCATABLE_KERNEL: 0x234, // u8 (2.05+)
  MIN_ALIGNMENT: 0x235, // u8: log2 (2.10+)
  XLOADFLAGS: 0x236, // u16 (2.12+)
  CMDLINE_SIZE: 0x238, // u32: longest command line, without the NUL (2.06+)
  HARDWARE_SUBARCH: 0x23c, // u32
  HARDWARE_SUBARCH_DATA: 0x240, // u64
  PAYLOAD_OFFSET: 0x248, // u32
  PAYLOAD_LENGTH: 0x24c, // u32
  SETUP_DATA: 0x250, // u64
  PREF_ADDRESS: 0x258, // u64: preferred load address (2.10+)
  INIT_SIZE: 0x260, // u32: memory the kernel needs from its runtime start (2.10+)
  HANDOVER_OFFSET: 0x264, // u32
  KERNEL_INFO_OFFSET: 0x268, // u32
  END: 0x26c, // end of the fields defined as of protocol 2.15
} as const;

export const HDRS_MAGIC = 0x5372_6448; // "HdrS" read little-endian
export const BOOT_FLAG_MAGIC = 0xaa55;

/** loadflags */
export const LOADED_HIGH = 0x01;
export const KASLR_FLAG = 0x02;
export const QUIET_FLAG = 0x20;
export const KEEP_SEGMENTS = 0x40;
export const CAN_USE_HEAP = 0x80;

/** xloadflags */
export const XLF_KERNEL_64 = 0x01;
export const XLF_CAN_BE_LOADED_ABOVE_4G = 0x02;

/** type_of_loader: 0xff is "undefined / other", the id for loaders without an assigned one. */
export const LOADER_TYPE_UNDEFINED = 0xff;

/**
 * heap_end_ptr the way boot.rst's sample loader sets it (heap end 0xe000, minus 0x200). Only
 * the real-mode setup code reads it; tskvm enters past that code, but a kernel that looks
 * at CAN_USE_HEAP finds a consistent pair.
 */
export const DEFAULT_HEAP_END_PTR = 0xe000 - 0x200;

export const MIN_BOOT_PROTOCOL = 0x0206;

export function formatProtocol(version: number): string {
  return `${version >> 8}.${(version & 0xff).toString().padStart(2, "0")}`;
}
