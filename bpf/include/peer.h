/* SPDX-License-Identifier: GPL-2.0 */
/* getpeername() of a steered socket: the original destination, not the
 * forwarder listener, so the application sees what it connected to. */
#ifndef MESH_PEER_H
#define MESH_PEER_H

#include "maps.h"
#include "addr.h"

/* The original destination of the steered connection whose client end is
 * (this netns, addr, port); NULL if the socket was not steered. */
static __always_inline struct mesh_orig *mesh_orig_of(struct bpf_sock_addr *ctx,
						      const struct mesh_addr *addr, __u16 port)
{
	struct mesh_tuple key = {};

	key.netns = bpf_get_netns_cookie(ctx);
	key.addr = *addr;
	key.port = port;
	return mesh_orig_tup.lookup(&key);
}

#endif /* MESH_PEER_H */
