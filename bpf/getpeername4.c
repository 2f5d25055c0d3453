/* SPDX-License-Identifier: GPL-2.0 */
/* cgroup/getpeername4: a steered IPv4 socket reports the destination the
 * application asked for, not 127.0.0.1:<forwarder port> (as Cilium's
 * socket-LB does). Also runs for accept(): the forwarder's accepted sockets
 * have no entry and keep their real peer.
 * Must never: fail the call (always returns 1), touch a socket that was not
 * steered. Minimum kernel: 5.8 (getpeername hooks). */
#include "include/peer.h"

int mesh_getpeer4(struct bpf_sock_addr *ctx)
{
	struct mesh_addr local;
	struct mesh_orig *orig;
	struct bpf_sock *sk = ctx->sk;

	if (!sk || (bpf_ntohl(ctx->user_ip4) >> 24) != 127)
		return 1;
	mesh_addr_from4(&local, sk->src_ip4);
	orig = mesh_orig_of(ctx, &local, (__u16)sk->src_port);
	if (orig && mesh_addr_is_mapped(&orig->addr)) {
		ctx->user_ip4 = orig->addr.a[3];
		ctx->user_port = bpf_htons(orig->port);
	}
	return 1;
}
