/* meshgate's L4 mesh: published ports of this node load-balanced over the service's tasks.
 *
 * meshgate_xdp (XDP, the uplink's ingress): a packet to <node_ip>:<published port> is given
 * a task (the connection table, else Maglev over the flow) and translated to the task's
 * address and port. Anything else goes to the kernel untouched.
 *
 * A task on another node: the translated packet is wrapped in IP-in-IP to that node (the outer
 * header's ID carries the published port) and sent back out of the uplink.
 *
 * meshgate_tc_in (tc, the uplink's ingress): IP-in-IP from another node is unwrapped for the
 * local task (given the address this node reaches it at, when the other node named it by its
 * overlay address), noting the node and port the client contacted, so that the reply can
 * carry them.
 * Then every translated packet for a local task is sent straight to the device its route
 * uses (a Docker bridge), past the node's netfilter: Docker's FORWARD chain drops forwarded
 * packets it did not publish itself.
 *
 * meshgate_tc_reply (tc, the ingress of the devices local tasks are reached through): a
 * task's reply to a translated flow gets back the address and port the client contacted
 * (this node's, or the node the flow came in on: the reply goes straight to the client, which
 * needs the nodes on one L2 segment or an underlay that accepts another node's source
 * address) and is sent out toward the client, past netfilter too (conntrack never saw the
 * flow, and Docker's masquerading would rewrite the source).
 *
 * The tc programs answer TC_ACT_UNSPEC for packets that are not theirs, so that two agents'
 * programs can sit on one device while one hands over to the next.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "consts.h"
#include "structs.h"
#include "maps.h"
#include "parsing.h"
#include "csum.h"

char LICENSE[] SEC("license") = "GPL";

#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7) /* newer than Debian's uapi headers */
#endif
#ifndef IPPROTO_IPIP
#define IPPROTO_IPIP 4
#endif
#define IP_DF 0x4000

/* This node's address on the uplink (network order), set by the loader. */
volatile const __u32 node_ip = 0;

static __always_inline void count(__u32 stat, __u64 bytes)
{
	struct counters *c = bpf_map_lookup_elem(&verdict_stats, &stat);
	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

static __always_inline void count_service(__u32 id, __u64 bytes)
{
	struct counters *c = bpf_map_lookup_elem(&service_stats, &id);
	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

/* A hash of the flow for Maglev (murmur3's finalizer over the mixed tuple). */
static __always_inline __u32 flow_hash(const struct flow_key *f)
{
	__u32 h = f->saddr ^ (f->daddr * 0x9e3779b1u) ^ (((__u32)f->sport << 16 | f->dport) * 0x85ebca6bu) ^ f->proto;
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

/* The backend for a new flow of service `svc`, from its Maglev row. */
static __always_inline struct backend *pick(const struct svc_info *svc, const struct flow_key *f, __u32 *slot)
{
	__u32 idx = svc->id * MAGLEV_SIZE + flow_hash(f) % MAGLEV_SIZE;
	__u32 *b = bpf_map_lookup_elem(&maglev, &idx);
	if (!b)
		return 0;
	*slot = *b;
	struct backend *be = bpf_map_lookup_elem(&backends, slot);
	if (!be || !(be->flags & BACKEND_LIVE))
		return 0;
	return be;
}

/* Another live task of service `svc` than the one in `avoid`, for a SYN the task it went to
 * did not answer: the Maglev row read at other places along the flow's hash. Each place
 * holds the avoided task with the odds of its share (1/3 with three tasks), so a few places
 * left one flow in 81 on a task whose node was cut off, retrying it there until it timed
 * out; PICK_OTHER_TRIES places make that one in 43 million (three tasks), one in 65,536
 * (two). None found (a service of one task): 0, and the caller keeps the task it had. */
#define PICK_OTHER_TRIES 16
static __always_inline struct backend *pick_other(const struct svc_info *svc, const struct flow_key *f, __u32 avoid, __u32 *slot)
{
	__u32 h = flow_hash(f);
#pragma unroll
	for (int i = 1; i <= PICK_OTHER_TRIES; i++) {
		__u32 idx = svc->id * MAGLEV_SIZE + (h + i * 0x9e3779b1u) % MAGLEV_SIZE;
		__u32 *b = bpf_map_lookup_elem(&maglev, &idx);
		if (!b || *b == avoid)
			continue;
		struct backend *be = bpf_map_lookup_elem(&backends, b);
		if (be && (be->flags & BACKEND_LIVE) && !(be->flags & BACKEND_DRAINING)) {
			*slot = *b;
			return be;
		}
	}
	return 0;
}

/* A TCP connection request: SYN without ACK. */
static __always_inline int is_syn(const struct packet *pkt)
{
	const struct tcphdr *tcp = (const void *)pkt->sport; /* the ports start the TCP header */
	return tcp->syn && !tcp->ack;
}

/* Rewrites the destination to addr:port, fixing both checksums. */
static __always_inline void dnat(struct packet *pkt, __u32 addr, __u16 port)
{
	__u32 old_addr = pkt->ip->daddr;
	__u16 old_port = *pkt->dport;
	pkt->ip->daddr = addr;
	pkt->ip->check = csum_replace4(pkt->ip->check, old_addr, addr);
	*pkt->dport = port;
	/* UDP without a checksum (0) stays without one. */
	if (pkt->proto == IPPROTO_UDP && *pkt->l4_check == 0)
		return;
	__u16 check = csum_replace4(*pkt->l4_check, old_addr, addr);
	check = csum_replace2(check, old_port, port);
	if (pkt->proto == IPPROTO_UDP && check == 0)
		check = 0xffff;
	*pkt->l4_check = check;
}

/* Wraps the (already translated) packet in IPv4 to `owner`, the task's node, and sends it out
 * of the interface the route to that node uses. */
static __always_inline int encap(struct xdp_md *ctx, __u32 owner, __u16 published, __u64 bytes)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *inner = (void *)(eth + 1);
	if ((void *)(inner + 1) > data_end)
		return XDP_DROP;
	__u16 inner_len = bpf_ntohs(inner->tot_len);
	struct bpf_fib_lookup fib = {};
	fib.family = 2; /* AF_INET */
	fib.ipv4_src = node_ip;
	fib.ipv4_dst = owner;
	fib.tot_len = inner_len + sizeof(struct iphdr);
	fib.ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS) {
		count(STAT_DROP_NO_ROUTE, bytes);
		return XDP_DROP;
	}
	if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct iphdr)))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	struct iphdr *outer = (void *)(eth + 1);
	if ((void *)(outer + 1) > data_end)
		return XDP_DROP;
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	outer->version = 4;
	outer->ihl = 5;
	outer->tos = 0;
	outer->tot_len = bpf_htons(inner_len + sizeof(struct iphdr));
	outer->id = published; /* read back by the owner's meshgate_tc_in */
	outer->frag_off = bpf_htons(IP_DF);
	outer->ttl = 64;
	outer->protocol = IPPROTO_IPIP;
	outer->saddr = node_ip;
	outer->daddr = owner;
	outer->check = 0;
	outer->check = ip_header_checksum((__u16 *)outer);
	count(STAT_REMOTE, bytes);
	/* Back out of the uplink: redirect rather than XDP_TX, which a veth only delivers when
	 * its peer runs XDP too (see XDP-NOTES). */
	return bpf_redirect(fib.ifindex, 0);
}

/* Answers a TCP segment of a flow whose task is gone with a reset from the address the
 * client contacted (RFC 9293 3.10.7.1), so the connection ends now instead of timing out. */
static __always_inline int reset(struct xdp_md *ctx, __u64 bytes)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return XDP_DROP;
	if (tcp->rst)
		return XDP_DROP; /* never answer a reset */
	__u32 header = sizeof(struct iphdr) + tcp->doff * 4;
	__u32 total = bpf_ntohs(ip->tot_len);
	__u32 payload = total > header ? total - header : 0;
	__u32 has_ack = tcp->ack;
	__u32 seq = has_ack ? tcp->ack_seq : 0;
	__u32 ack = bpf_htonl(bpf_ntohl(tcp->seq) + payload + tcp->syn + tcp->fin);

	__u8 mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	__u32 addr = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = addr;
	ip->tos = 0;
	ip->tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct tcphdr));
	ip->id = 0;
	ip->frag_off = bpf_htons(IP_DF);
	ip->ttl = 64;
	ip->check = 0;
	ip->check = ip_header_checksum((__u16 *)ip);
	__u16 port = tcp->source;
	tcp->source = tcp->dest;
	tcp->dest = port;
	tcp->seq = seq;
	tcp->ack_seq = has_ack ? 0 : ack;
	((__u16 *)tcp)[6] = has_ack ? bpf_htons(0x5004) : bpf_htons(0x5014); /* header length 20; RST or RST+ACK */
	tcp->window = 0;
	tcp->check = 0;
	tcp->urg_ptr = 0;

	int tail = (int)(sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct tcphdr)) - (int)(data_end - data);
	if (tail && bpf_xdp_adjust_tail(ctx, tail))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return XDP_DROP;
	__u32 sum = (ip->saddr & 0xffff) + (ip->saddr >> 16) + (ip->daddr & 0xffff) + (ip->daddr >> 16) + bpf_htons(IPPROTO_TCP) + bpf_htons(sizeof(struct tcphdr));
	const __u16 *words = (const __u16 *)tcp;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += words[i];
	tcp->check = ~csum_fold(sum);
	count(STAT_RESET, bytes);
	return bpf_redirect(ctx->ingress_ifindex, 0);
}

SEC("xdp")
int meshgate_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 bytes = data_end - data;
	struct packet pkt = {};
	int pass = parse(data, data_end, &pkt);
	if (pass >= 0) {
		count(pass, bytes);
		return XDP_PASS;
	}
	if (pkt.ip->daddr != node_ip) {
		count(STAT_PASS_NOT_PUBLISHED, bytes);
		return XDP_PASS;
	}
	struct svc_key key = {.port = *pkt.dport, .proto = pkt.proto};
	struct svc_info *svc = bpf_map_lookup_elem(&services, &key);
	if (!svc) {
		count(STAT_PASS_NOT_PUBLISHED, bytes);
		return XDP_PASS;
	}
	struct flow_key flow = {
		.saddr = pkt.ip->saddr, .daddr = pkt.ip->daddr, .sport = *pkt.sport, .dport = *pkt.dport, .proto = pkt.proto,
	};
	struct backend *be = 0;
	__u32 slot = 0;
	struct flow_val *known = bpf_map_lookup_elem(&flows, &flow);
	if (known && pkt.proto == IPPROTO_TCP && is_syn(&pkt)) {
		/* A SYN again: the first got no answer (the task stopped before this node learned
		 * it, or is overloaded), or a new connection reuses the addresses. Another task
		 * takes it when the service has one. */
		struct backend *other = pick_other(svc, &flow, known->backend, &slot);
		if (other) {
			be = other;
			known = 0;
		}
	}
	if (known) {
		slot = known->backend;
		be = bpf_map_lookup_elem(&backends, &slot);
		/* The task is gone (its slot is empty or now holds another task), or it drains and
		 * this SYN opens nothing yet (a retransmitted first SYN): a live task takes it. */
		if (be && (!(be->flags & BACKEND_LIVE) || be->addr != known->addr || be->port != known->port ||
			   ((be->flags & BACKEND_DRAINING) && pkt.proto == IPPROTO_TCP && is_syn(&pkt))))
			be = 0;
		if (!be) {
			bpf_map_delete_elem(&flows, &flow);
			/* A SYN (its first one went to the task as it died) opens no connection yet:
			 * it gets a live task below. Anything later of a TCP flow ends with a reset. */
			if (pkt.proto == IPPROTO_TCP && !is_syn(&pkt))
				return reset(ctx, bytes);
			if (pkt.proto != IPPROTO_TCP) {
				count(STAT_DROP_NO_BACKEND, bytes);
				return XDP_DROP;
			}
			known = 0;
		}
	}
	if (!known) {
		if (!be)
			be = pick(svc, &flow, &slot);
		if (!be) {
			count(STAT_DROP_NO_BACKEND, bytes);
			return XDP_DROP;
		}
		struct flow_val val = {.backend = slot, .addr = be->addr, .port = be->port};
		bpf_map_update_elem(&flows, &flow, &val, BPF_ANY);
	}
	/* A local task's replies go out as from this node's published port: noted for a new
	 * flow, and again for each SYN of a known one. The client may have reached the same
	 * task with the same port through another node since (its ports are chosen per
	 * destination), which pointed the entry there: the SYN-ACK would go out as from that
	 * node, and the client would reset it, SYN after SYN. (For a task on another node, its
	 * node notes this when it unwraps the packet, every packet.) */
	if ((be->flags & BACKEND_LOCAL) && (!known || pkt.proto != IPPROTO_TCP || is_syn(&pkt))) {
		struct flow_key back = {.saddr = be->addr, .daddr = flow.saddr, .sport = be->port, .dport = flow.sport, .proto = flow.proto};
		struct reply_val *had = bpf_map_lookup_elem(&replies, &back);
		if (had) {
			/* Kept by the previous agent (the table is shared across an update), or
			 * pointed elsewhere: keeps the SYN's sequence number too. */
			if (had->addr != flow.daddr || had->port != flow.dport) {
				had->addr = flow.daddr;
				had->port = flow.dport;
			}
		} else {
			struct reply_val reply = {.addr = flow.daddr, .port = flow.dport};
			bpf_map_update_elem(&replies, &back, &reply, BPF_ANY);
		}
	}
	count_service(svc->id, bytes);
	__u32 owner = be->node_addr;
	__u16 published = flow.dport;
	int local = be->flags & BACKEND_LOCAL;
	dnat(&pkt, be->addr, be->port);
	if (local) {
		count(STAT_LOCAL, bytes);
		return XDP_PASS;
	}
	return encap(ctx, owner, published, bytes);
}

/* Sends the packet out of the device the route to `dst` uses, with the neighbour's MAC
 * (resolved by the kernel if it is not known yet): forwarding without netfilter. Returns
 * -1 when there is no route, or, with `direct_only`, when the route goes through a gateway:
 * a task is on a network of this node, and a packet for one must never leave by the
 * default route (a task gone, an address no longer mapped). */
static __always_inline int redirect_route(struct __sk_buff *skb, __u32 src, __u32 dst, int direct_only)
{
	struct bpf_fib_lookup fib = {};
	fib.family = 2; /* AF_INET */
	fib.ipv4_src = src;
	fib.ipv4_dst = dst;
	fib.ifindex = skb->ingress_ifindex;
	/* tot_len 0: the kernel checks the MTU itself, knowing GSO packets. */
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return -1;
	if (direct_only && fib.ipv4_dst != dst)
		return -1;
	/* The lookup left the next hop (the gateway, else dst itself) in ipv4_dst. */
	struct bpf_redir_neigh nh = {.nh_family = 2, .ipv4_nh = fib.ipv4_dst};
	return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

/* An unwrapped packet from another node names the task by the address that node knows (an
 * overlay address); this node reaches the task at another one (docker_gwbridge): the
 * destination becomes that one, checksums fixed by the helpers. Returns -1 on a helper
 * failure, 0 otherwise. */
static __always_inline int to_local_address(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct packet pkt = {};
	if (parse(data, data_end, &pkt) >= 0)
		return 0;
	__u32 old_addr = pkt.ip->daddr;
	__u32 *local = bpf_map_lookup_elem(&local_addrs, &old_addr);
	if (!local)
		return 0;
	__u32 new_addr = *local;
	__u32 ip_off = sizeof(struct ethhdr);
	__u32 l4_off = ip_off + sizeof(struct iphdr);
	__u32 check_off = l4_off + (pkt.proto == IPPROTO_TCP ? __builtin_offsetof(struct tcphdr, check) : __builtin_offsetof(struct udphdr, check));
	if (!(pkt.proto == IPPROTO_UDP && *pkt.l4_check == 0) &&
	    bpf_l4_csum_replace(skb, check_off, old_addr, new_addr, BPF_F_PSEUDO_HDR | sizeof(new_addr) | (pkt.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0)))
		return -1;
	if (bpf_l3_csum_replace(skb, ip_off + __builtin_offsetof(struct iphdr, check), old_addr, new_addr, sizeof(new_addr)))
		return -1;
	return bpf_skb_store_bytes(skb, ip_off + __builtin_offsetof(struct iphdr, daddr), &new_addr, sizeof(new_addr), 0) ? -1 : 0;
}

/* The reply key of a packet going to a task: what the task's answers will look like. */
static __always_inline struct flow_key reply_key(const struct packet *pkt)
{
	struct flow_key back = {
		.saddr = pkt->ip->daddr, .daddr = pkt->ip->saddr, .sport = *pkt->dport, .dport = *pkt->sport, .proto = pkt->proto,
	};
	return back;
}

/* A client's TCP segment on its way to the task: a SYN starts a connection (noted to tell its
 * SYN-ACK from another's), a FIN and whatever follows it are awaited answers (REPLY_*). */
static __always_inline void note_client_segment(struct reply_val *reply, const struct tcphdr *tcp)
{
	if (tcp->syn && !tcp->ack) {
		reply->syn_seq = tcp->seq;
		if (reply->state)
			reply->state = 0;
		return;
	}
	if (tcp->fin || reply->state) {
		__u16 state = reply->state | REPLY_ANSWER_DUE | (tcp->fin ? REPLY_CLIENT_FIN : 0);
		if (state != reply->state)
			reply->state = state;
	}
}

/* A task's TCP segment to a client with a reply entry: 0 to translate it, or -1 when it is
 * not ours. A SYN-ACK that does not answer the SYN tc delivered belongs to a connection
 * opened past the mesh that reuses a finished flow's addresses; so does a bare ACK after both
 * FINs that answers nothing delivered (REPLY_*: the task's TIME-WAIT answering another
 * path's SYN). Either way the entry goes and the kernel handles the packet. */
static __always_inline int note_task_segment(struct reply_val *found, const struct tcphdr *tcp)
{
	if (tcp->syn && tcp->ack)
		return bpf_ntohl(tcp->ack_seq) == bpf_ntohl(found->syn_seq) + 1 ? 0 : -1;
	__u16 state = found->state;
	if (!state && !tcp->fin)
		return 0; /* the common case: an open connection */
	if ((state & (REPLY_CLIENT_FIN | REPLY_TASK_FIN)) == (REPLY_CLIENT_FIN | REPLY_TASK_FIN) &&
	    !(state & REPLY_ANSWER_DUE) && !tcp->fin && !tcp->rst)
		return -1;
	state = (state & ~REPLY_ANSWER_DUE) | (tcp->fin ? REPLY_TASK_FIN : 0);
	if (state != found->state)
		found->state = state;
	return 0;
}

SEC("classifier")
int meshgate_tc_in(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *outer = (void *)(eth + 1);
	if ((void *)(outer + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	struct packet pkt = {};
	if (outer->protocol == IPPROTO_IPIP && outer->ihl == 5 && outer->daddr == node_ip) {
		struct packet inner = {};
		if (parse_ip((void *)(outer + 1), data_end, &inner) >= 0)
			return TC_ACT_UNSPEC; /* not a flow of ours: the next program, or the kernel */
		struct reply_val from = {.addr = outer->saddr, .port = outer->id};
		if (bpf_skb_adjust_room(skb, -(int)sizeof(struct iphdr), BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_DECAP_L3_IPV4))
			return TC_ACT_SHOT;
		count(STAT_DECAP, skb->len);
		if (to_local_address(skb) < 0)
			return TC_ACT_SHOT;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (parse(data, data_end, &pkt) >= 0)
			return TC_ACT_SHOT; /* it parsed before the unwrapping */
		struct flow_key back = reply_key(&pkt);
		struct reply_val *known = bpf_map_lookup_elem(&replies, &back);
		if (known) {
			/* Keeps the SYN's sequence number noted below. */
			known->addr = from.addr;
			known->port = from.port;
		} else {
			bpf_map_update_elem(&replies, &back, &from, BPF_ANY);
		}
	} else if (parse(data, data_end, &pkt) >= 0) {
		return TC_ACT_UNSPEC;
	}
	if (pkt.ip->daddr == node_ip) {
		/* Still to a published port: no XDP program translated it (one agent hands over to
		 * the next during an update). Dropped, the client sends it again; handed to the
		 * kernel, it would be refused. */
		struct svc_key key = {.port = *pkt.dport, .proto = pkt.proto};
		if (bpf_map_lookup_elem(&services, &key)) {
			count(STAT_DROP_UNTRANSLATED, skb->len);
			return TC_ACT_SHOT;
		}
		return TC_ACT_UNSPEC;
	}
	/* Translated packets are the ones to a flow with a reply entry. */
	struct flow_key back = reply_key(&pkt);
	struct reply_val *reply = bpf_map_lookup_elem(&replies, &back);
	if (!reply)
		return TC_ACT_UNSPEC;
	if (pkt.proto == IPPROTO_TCP)
		note_client_segment(reply, (struct tcphdr *)pkt.sport);
	int sent = redirect_route(skb, pkt.ip->saddr, pkt.ip->daddr, 1);
	if (sent < 0) {
		count(STAT_DROP_NO_ROUTE, skb->len);
		return TC_ACT_SHOT;
	}
	return sent;
}

SEC("classifier")
int meshgate_tc_reply(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct packet pkt = {};
	if (parse(data, data_end, &pkt) >= 0)
		return TC_ACT_UNSPEC;
	struct flow_key back = {
		.saddr = pkt.ip->saddr, .daddr = pkt.ip->daddr, .sport = *pkt.sport, .dport = *pkt.dport, .proto = pkt.proto,
	};
	struct reply_val *found = bpf_map_lookup_elem(&replies, &back);
	if (!found)
		return TC_ACT_UNSPEC;
	if (pkt.proto == IPPROTO_TCP && note_task_segment(found, (struct tcphdr *)pkt.sport) < 0) {
		bpf_map_delete_elem(&replies, &back);
		return TC_ACT_UNSPEC;
	}
	struct reply_val reply = *found;
	__u32 client = pkt.ip->daddr;
	__u32 old_addr = pkt.ip->saddr, new_addr = reply.addr;
	__u16 old_port = *pkt.sport, new_port = reply.port;
	__u32 ip_off = sizeof(struct ethhdr);
	__u32 addr_off = ip_off + __builtin_offsetof(struct iphdr, saddr);
	__u32 l4_off = ip_off + sizeof(struct iphdr);
	__u32 check_off = l4_off + (pkt.proto == IPPROTO_TCP ? __builtin_offsetof(struct tcphdr, check) : __builtin_offsetof(struct udphdr, check));
	__u32 udp_nocheck = pkt.proto == IPPROTO_UDP && *pkt.l4_check == 0;
	/* The helpers keep CHECKSUM_PARTIAL packets (from local tasks) right. */
	if (!udp_nocheck) {
		bpf_l4_csum_replace(skb, check_off, old_addr, new_addr, BPF_F_PSEUDO_HDR | sizeof(new_addr) | (pkt.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0));
		bpf_l4_csum_replace(skb, check_off, old_port, new_port, sizeof(new_port) | (pkt.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0));
	}
	bpf_l3_csum_replace(skb, ip_off + __builtin_offsetof(struct iphdr, check), old_addr, new_addr, sizeof(new_addr));
	bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0);
	bpf_skb_store_bytes(skb, l4_off, &new_port, sizeof(new_port), 0); /* source port: first field of TCP and UDP */
	/* Handed to the stack, a packet from a local address arriving on this device would be
	 * dropped: send it on toward the client instead. */
	int sent = redirect_route(skb, new_addr, client, 0);
	if (sent < 0) {
		count(STAT_DROP_NO_ROUTE, skb->len);
		return TC_ACT_SHOT;
	}
	count(STAT_REPLY, skb->len);
	return sent;
}
