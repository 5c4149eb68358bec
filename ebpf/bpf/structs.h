/* Map keys and values. Each has a #[repr(C)] mirror in ebpf/src/maps.rs with a size check. */
#pragma once
#include <linux/types.h>

/* A published port. */
struct svc_key {
	__u16 port; /* network order */
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;
};

struct svc_info {
	__u32 id; /* row in maglev, slot in service_stats */
};

/* A task, by slot. Addresses and ports in network order. */
struct backend {
	__u32 addr;
	__u32 node_addr; /* the node that runs it */
	__u16 port;
	__u16 flags;
};

/* One direction of a connection. Network order. */
struct flow_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* Where a client's flow goes: the backend slot and, to notice a slot that was reused for
 * another task, the task's address and port at the time. */
struct flow_val {
	__u32 backend;
	__u32 addr;
	__u16 port;
	__u16 pad;
};

/* What a task's reply must look like to the client: the address and port it contacted. */
struct reply_val {
	__u32 addr;
	__u16 port;
	__u16 state; /* REPLY_* bits: how far the connection through the mesh has closed (TCP) */
	/* The sequence number of the last SYN delivered to the task (TCP), so that a SYN-ACK
	 * of a connection opened some other way (another NAT to the same task, reusing a
	 * finished flow's addresses) is told apart from ours. */
	__u32 syn_seq;
};

struct counters {
	__u64 packets;
	__u64 bytes;
};
