/* One parse path for both programs: Ethernet, IPv4 without options, TCP or UDP. */
#pragma once
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include "consts.h"

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* A parsed packet: header pointers (bounds already checked) and its flow. */
struct packet {
	struct ethhdr *eth;
	struct iphdr *ip;
	__u16 *sport; /* the L4 ports, TCP or UDP alike */
	__u16 *dport;
	__u16 *l4_check; /* TCP or UDP checksum field */
	__u8 proto;
};

/* Fills `pkt` from an IPv4 header at `ip`. Returns -1 to keep going, or the STAT_PASS_*
 * reason to leave the packet alone. */
static __always_inline int parse_ip(struct iphdr *ip, void *data_end, struct packet *pkt)
{
	if ((void *)(ip + 1) > data_end)
		return STAT_PASS_TRUNCATED;
	if (ip->version != 4)
		return STAT_PASS_NOT_IPV4;
	if (ip->ihl != 5)
		return STAT_PASS_IP_OPTIONS;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return STAT_PASS_FRAGMENT;
	pkt->ip = ip;
	pkt->proto = ip->protocol;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(ip + 1);
		if ((void *)(tcp + 1) > data_end)
			return STAT_PASS_TRUNCATED;
		pkt->sport = &tcp->source;
		pkt->dport = &tcp->dest;
		pkt->l4_check = &tcp->check;
		return -1;
	}
	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > data_end)
			return STAT_PASS_TRUNCATED;
		pkt->sport = &udp->source;
		pkt->dport = &udp->dest;
		pkt->l4_check = &udp->check;
		return -1;
	}
	return STAT_PASS_OTHER_PROTO;
}

/* Fills `pkt` from an Ethernet frame. Returns -1 or a STAT_PASS_* reason, as parse_ip. */
static __always_inline int parse(void *data, void *data_end, struct packet *pkt)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return STAT_PASS_TRUNCATED;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return STAT_PASS_NOT_IPV4;
	pkt->eth = eth;
	return parse_ip((void *)(eth + 1), data_end, pkt);
}
