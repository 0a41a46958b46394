/** Synthetic kernel images for loader and CLI tests. */

export interface BzOptions {
  version?: number;
  setupSects?: number;
  codeBytes?: number;
  loadflags?: number;
  xloadflags?: number;
  cmdlineSize?: number;
  initrdAddrMax?: number;
  relocatable?: boolean;
  kernelAlignment?: number;
  prefAddress?: number;
  initSize?: number;
  bootFlag?: number;
  /** Drop this many bytes from the end of the file. */
  chop?: number;
}

/** A minimal bzImage: a boot sector with the setup header, setup sectors, and patterned "code". */
export function makeBzImage(o: BzOptions = {}): Uint8Array {
  const setupSects = o.setupSects ?? 1;
  const setupBytes = ((setupSects || 4) + 1) * 512;
  const codeBytes = o.codeBytes ?? 4096;
  const image = new Uint8Array(setupBytes + codeBytes);
  const v = new DataView(image.buffer);
  v.setUint8(0x1f1, setupSects);
  v.setUint32(0x1f4, codeBytes / 16, true);
  v.setUint16(0x1fe, o.bootFlag ?? 0xaa55, true);
  v.setUint8(0x200, 0xeb); // jmp short
  v.setUint8(0x201, 0x26c - 0x202); // ...to the end of the header
  image.set(Buffer.from("HdrS"), 0x202);
  v.setUint16(0x206, o.version ?? 0x020f, true);
  v.setUint8(0x211, o.loadflags ?? 0x01);
  v.setUint32(0x214, 0x100000, true);
  v.setUint32(0x22c, o.initrdAddrMax ?? 0x7fff_ffff, true);
  v.setUint32(0x230, o.kernelAlignment ?? 0x20_0000, true);
  v.setUint8(0x234, o.relocatable === false ? 0 : 1);
  v.setUint16(0x236, o.xloadflags ?? 0x1, true);
  v.setUint32(0x238, o.cmdlineSize ?? 2047, true);
  v.setBigUint64(0x258, BigInt(o.prefAddress ?? 0x100_0000), true);
  v.setUint32(0x260, o.initSize ?? 0x40_0000, true);
  for (let i = 0; i < codeBytes; i++) image[setupBytes + i] = (i * 7 + 3) & 0xff;
  return image.subarray(0, image.byteLength - (o.chop ?? 0));
}

