/*
 * tun_abi.c - print the TUN/TAP and virtio-net ABI as the host's C headers define it.
 *
 * test/unit/tap.test.ts compiles this file (via scripts/lib/native.ts), runs it and
 * compares every line with what src/net/tap.ts (TunAbi) and src/devices/virtio/net.ts
 * export. Output: "name value" per line, value in decimal. Names:
 *
 *   TunAbi.X              X from <linux/if_tun.h> / <linux/if.h>, or a struct ifreq fact
 *   VirtioNetFeature.X    VIRTIO_NET_F_X
 *   NetConfig.X           offsetof(struct virtio_net_config, x); SIZE up to and with mtu
 *   NetHdr.X              offsetof(struct virtio_net_hdr_mrg_rxbuf, ...) and the sizes
 *   VIRTIO_NET_S_LINK_UP, VIRTIO_NET_HDR_F_*, VirtioNetGso.X (VIRTIO_NET_HDR_GSO_X)
 */
#include <stddef.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <linux/virtio_net.h>

#define P(name, value) printf("%s %llu\n", name, (unsigned long long)(value))
#define TUN(x) P("TunAbi." #x, x)
#define FEAT(x) P("VirtioNetFeature." #x, VIRTIO_NET_F_##x)
#define GSO(x) P("VirtioNetGso." #x, VIRTIO_NET_HDR_GSO_##x)

int main(void)
{
	TUN(TUNSETIFF);
	TUN(TUNSETPERSIST);
	TUN(TUNGETFEATURES);
	TUN(TUNSETOFFLOAD);
	TUN(TUNGETIFF);
	TUN(TUNSETVNETHDRSZ);
	TUN(IFF_TUN);
	TUN(IFF_TAP);
	TUN(IFF_MULTI_QUEUE);
	TUN(IFF_PERSIST);
	TUN(IFF_NO_PI);
	TUN(IFF_VNET_HDR);
	TUN(TUN_F_CSUM);
	TUN(TUN_F_TSO4);
	TUN(TUN_F_TSO6);
	TUN(TUN_F_TSO_ECN);
	TUN(TUN_F_UFO);
	TUN(IFNAMSIZ);
	P("TunAbi.IFREQ_SIZE", sizeof(struct ifreq));
	P("TunAbi.IFR_NAME", offsetof(struct ifreq, ifr_name));
	P("TunAbi.IFR_FLAGS", offsetof(struct ifreq, ifr_flags));

	FEAT(CSUM);
	FEAT(GUEST_CSUM);
	FEAT(CTRL_GUEST_OFFLOADS);
	FEAT(MTU);
	FEAT(MAC);
	FEAT(GUEST_TSO4);
	FEAT(GUEST_TSO6);
	FEAT(GUEST_ECN);
	FEAT(GUEST_UFO);
	FEAT(HOST_TSO4);
	FEAT(HOST_TSO6);
	FEAT(HOST_ECN);
	FEAT(HOST_UFO);
	FEAT(MRG_RXBUF);
	FEAT(STATUS);
	FEAT(CTRL_VQ);
	FEAT(CTRL_RX);
	FEAT(CTRL_VLAN);
	FEAT(GUEST_ANNOUNCE);
	FEAT(MQ);
	FEAT(CTRL_MAC_ADDR);

	P("NetConfig.MAC", offsetof(struct virtio_net_config, mac));
	P("NetConfig.STATUS", offsetof(struct virtio_net_config, status));
	P("NetConfig.MAX_VIRTQUEUE_PAIRS", offsetof(struct virtio_net_config, max_virtqueue_pairs));
	P("NetConfig.MTU", offsetof(struct virtio_net_config, mtu));
	P("NetConfig.SIZE", offsetof(struct virtio_net_config, mtu) + sizeof(__u16));

	P("NetHdr.FLAGS", offsetof(struct virtio_net_hdr, flags));
	P("NetHdr.GSO_TYPE", offsetof(struct virtio_net_hdr, gso_type));
	P("NetHdr.HDR_LEN", offsetof(struct virtio_net_hdr, hdr_len));
	P("NetHdr.GSO_SIZE", offsetof(struct virtio_net_hdr, gso_size));
	P("NetHdr.CSUM_START", offsetof(struct virtio_net_hdr, csum_start));
	P("NetHdr.CSUM_OFFSET", offsetof(struct virtio_net_hdr, csum_offset));
	P("NetHdr.NUM_BUFFERS", offsetof(struct virtio_net_hdr_mrg_rxbuf, num_buffers));
	P("NetHdr.SIZE", sizeof(struct virtio_net_hdr));
	P("NetHdr.MRG_SIZE", sizeof(struct virtio_net_hdr_mrg_rxbuf));

	P("VIRTIO_NET_S_LINK_UP", VIRTIO_NET_S_LINK_UP);
	P("VIRTIO_NET_HDR_F_NEEDS_CSUM", VIRTIO_NET_HDR_F_NEEDS_CSUM);
	P("VIRTIO_NET_HDR_F_DATA_VALID", VIRTIO_NET_HDR_F_DATA_VALID);
	GSO(NONE);
	GSO(TCPV4);
	GSO(UDP);
	GSO(TCPV6);
	GSO(ECN);
	return 0;
}
