/* Every map, declared once. */
#pragma once
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "consts.h"
#include "structs.h"

/* Published ports of this node: port and protocol -> service. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES);
	__type(key, struct svc_key);
	__type(value, struct svc_info);
} services SEC(".maps");

/* Maglev lookup tables, one row of MAGLEV_SIZE backend slots per service. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SERVICES * MAGLEV_SIZE);
	__type(key, __u32);
	__type(value, __u32);
} maglev SEC(".maps");

/* Tasks by slot. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend);
} backends SEC(".maps");

/* Connection table: client flow -> backend, so a flow stays on its task. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_FLOWS);
	__type(key, struct flow_key);
	__type(value, struct flow_val);
} flows SEC(".maps");

/* Reply translation: task -> client flow -> the address and port the client contacted.
 * Pinned when mesh.pin_dir is set: the agents of one node share it across an update. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_FLOWS);
	__type(key, struct flow_key);
	__type(value, struct reply_val);
} replies SEC(".maps");

/* This node's tasks as other nodes name them (an overlay address, network order) -> the
 * address this node reaches them at (their docker_gwbridge address). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, __u32);
} local_addrs SEC(".maps");

/* Packets and bytes by verdict (STAT_*). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, struct counters);
} verdict_stats SEC(".maps");

/* Packets and bytes by service id. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct counters);
} service_stats SEC(".maps");
