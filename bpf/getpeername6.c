/* SPDX-License-Identifier: GPL-2.0 */
/* cgroup/getpeername6: the IPv6 twin of getpeername4.c, also for IPv4-mapped
 * peers of dual-stack sockets.
 * Must never: fail the call, touch a socket that was not steered.
 * Minimum kernel: 5.8. */
#include "include/peer.h"

int mesh_getpeer6(struct bpf_sock_addr *ctx)
{
	struct mesh_addr peer, local;
	struct mesh_orig *orig;
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return 1;
	peer.a[0] = ctx->user_ip6[0];
	peer.a[1] = ctx->user_ip6[1];
	peer.a[2] = ctx->user_ip6[2];
	peer.a[3] = ctx->user_ip6[3];
	if (!mesh_addr_is_loopback(&peer))
		return 1;
	local.a[0] = sk->src_ip6[0];
	local.a[1] = sk->src_ip6[1];
	local.a[2] = sk->src_ip6[2];
	local.a[3] = sk->src_ip6[3];
	orig = mesh_orig_of(ctx, &local, (__u16)sk->src_port);
	if (!orig)
		return 1;
	ctx->user_ip6[0] = orig->addr.a[0];
	ctx->user_ip6[1] = orig->addr.a[1];
	ctx->user_ip6[2] = orig->addr.a[2];
	ctx->user_ip6[3] = orig->addr.a[3];
	ctx->user_port = bpf_htons(orig->port);
	return 1;
}
