/* Sizes and flags shared by the programs. Each can be overridden by the build (-D...). */
#pragma once

#ifndef MAX_SERVICES
#define MAX_SERVICES 256 /* published ports */
#endif
#ifndef MAX_BACKENDS
#define MAX_BACKENDS 4096 /* tasks behind them, all services together */
#endif
#ifndef MAGLEV_SIZE
#define MAGLEV_SIZE 1021 /* lookup table entries per service (prime, >> tasks per service) */
#endif
#ifndef MAX_FLOWS
#define MAX_FLOWS 65536 /* connection table (LRU) */
#endif

/* svc_info.flags */

/* backend.flags */
#define BACKEND_LOCAL 1 /* the task runs on this node */
#define BACKEND_LIVE 2  /* the slot holds a task (cleared when it is removed) */
#define BACKEND_DRAINING 4 /* the task is gone from the table: its established flows go on, nothing new */

/* reply_val.state: the closing of a TCP connection through the mesh. Once both sides have
 * sent their FIN, the task only ever answers what reaches it; a bare ACK from it that answers
 * nothing delivered through the mesh (REPLY_ANSWER_DUE clear) answers a SYN that came another
 * way (Docker's -p DNAT from the same client port, meeting the task's TIME-WAIT) and is left
 * to the kernel, which hands it to that connection. Bits are set without atomics: a lost
 * update only falls back to translating the packet, as before the bits existed. */
#define REPLY_CLIENT_FIN 1
#define REPLY_TASK_FIN 2
#define REPLY_ANSWER_DUE 4 /* a client packet was delivered since the task last answered */

/* Indexes of verdict_stats: what happened to each packet the program saw. */
#define STAT_PASS_NOT_IPV4 0     /* not IPv4 (ARP, IPv6, ...) */
#define STAT_PASS_TRUNCATED 1    /* shorter than its headers say */
#define STAT_PASS_IP_OPTIONS 2   /* IPv4 options */
#define STAT_PASS_FRAGMENT 3     /* a fragment */
#define STAT_PASS_OTHER_PROTO 4  /* neither TCP nor UDP (ICMP, ...) */
#define STAT_PASS_NOT_PUBLISHED 5 /* not to a published port of this node */
#define STAT_LOCAL 6             /* translated to a task on this node (delivered by tc) */
#define STAT_REMOTE 7            /* sent to the node that owns the task */
#define STAT_DROP_NO_BACKEND 8   /* published, but no task can take it */
#define STAT_REPLY 9             /* a task's reply translated back (tc) */
#define STAT_DECAP 10            /* IP-in-IP from another node, unwrapped for a local task (tc) */
#define STAT_DROP_NO_ROUTE 11    /* no route to the task's node (or no neighbour entry yet), task or client */
#define STAT_RESET 12            /* a TCP flow whose task is gone, answered with a reset */
#define STAT_DROP_UNTRANSLATED 13 /* to a published port but not translated: no XDP program yet (tc) */
#define STAT_COUNT 14
