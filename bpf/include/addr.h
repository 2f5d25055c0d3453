/* SPDX-License-Identifier: GPL-2.0 */
#ifndef MESH_ADDR_H
#define MESH_ADDR_H

#include "maps.h"

#define MESH_MAPPED_PREFIX bpf_htonl(0x0000ffff)

static __always_inline void mesh_addr_from4(struct mesh_addr *out, __u32 ip4_be)
{
	out->a[0] = 0;
	out->a[1] = 0;
	out->a[2] = MESH_MAPPED_PREFIX;
	out->a[3] = ip4_be;
}

static __always_inline int mesh_addr_is_mapped(const struct mesh_addr *addr)
{
	return addr->a[0] == 0 && addr->a[1] == 0 && addr->a[2] == MESH_MAPPED_PREFIX;
}

/* A destination on this host: 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104,
 * and the unspecified 0.0.0.0, :: and ::ffff:0.0.0.0, which connect()
 * takes for a local address. */
static __always_inline int mesh_addr_is_loopback(const struct mesh_addr *addr)
{
	if (mesh_addr_is_mapped(addr))
		return (bpf_ntohl(addr->a[3]) >> 24) == 127 || addr->a[3] == 0;
	return addr->a[0] == 0 && addr->a[1] == 0 && addr->a[2] == 0 &&
	       (addr->a[3] == bpf_htonl(1) || addr->a[3] == 0);
}

#endif /* MESH_ADDR_H */
