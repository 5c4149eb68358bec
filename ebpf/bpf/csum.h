/* Incremental checksum updates (RFC 1624) for XDP, where the packet holds full checksums. */
#pragma once
#include <linux/types.h>

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* The checksum after a 32-bit field changed from `from` to `to` (all network order). */
static __always_inline __u16 csum_replace4(__u16 check, __u32 from, __u32 to)
{
	__u32 sum = (__u16)~check;
	sum += (__u16)~from + (__u16)~(from >> 16);
	sum += (__u16)to + (__u16)(to >> 16);
	return ~csum_fold(sum);
}

/* The same for a 16-bit field. */
static __always_inline __u16 csum_replace2(__u16 check, __u16 from, __u16 to)
{
	__u32 sum = (__u16)~check;
	sum += (__u16)~from;
	sum += to;
	return ~csum_fold(sum);
}

/* The checksum of a 20-byte IPv4 header (its check field must be 0). */
static __always_inline __u16 ip_header_checksum(const __u16 *words)
{
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += words[i];
	return ~csum_fold(sum);
}
