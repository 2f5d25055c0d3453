/* SPDX-License-Identifier: GPL-2.0 */
/* A pod's egress policy at connect(): one longest-prefix lookup of the
 * destination in mesh_pol_cidr (maps.h), then the first rule whose ports
 * hold the destination port (DENY rules come first). */
#ifndef MESH_POLICY_H
#define MESH_POLICY_H

#include "maps.h"

#define MESH_POL_RULES 16  /* the length of mesh_pol_val.r */
#define MESH_POL_ALLOW 1
#define MESH_POL_DENY 2

/* 1: allowed (or no policy governs the pod's egress), 0: denied; *rule:
 * the deciding rule's number << 16 | the generation's low bits (number 0:
 * the default deny). */
static __always_inline int mesh_policy_allows(__u64 netns, const struct mesh_addr *dst,
					      __u16 dport, __u32 *rule)
{
	struct mesh_pol_key key = {};
	struct mesh_pol_val *val;
	__u32 zero = 0, *gen, n, i;

	*rule = 0;
	gen = mesh_pol_gen.lookup(&zero);
	if (!gen)
		return 1;
	key.prefixlen = 96 + 128;
	key.gen = *gen;
	key.netns = netns;
	key.addr = *dst;
	val = mesh_pol_cidr.lookup(&key);
	if (!val)
		return 1;
	*rule = *gen & 0xffff;
	n = val->n;
#pragma unroll
	for (i = 0; i < MESH_POL_RULES; i++) {
		__u64 r = val->r[i];

		if (i >= n)
			break;
		if (dport >= (__u16)r && dport <= (__u16)(r >> 16)) {
			*rule |= (__u32)(r >> 40) << 16;
			return ((r >> 32) & 0xff) == MESH_POL_ALLOW;
		}
	}
	return 0;
}

#endif /* MESH_POLICY_H */
