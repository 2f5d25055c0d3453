/* SPDX-License-Identifier: GPL-2.0 */
/* cgroup/connect4: steer an attached pod's outbound IPv4 TCP connect() to
 * the pod's forwarder listener at 127.0.0.1:<port> in the pod's own netns,
 * remembering the original destination by socket cookie.
 * Decides: steer or go direct (with a counted reason).
 * Must never: fail a connect (returns 1), except a pod's over its share of
 * the connection maps (EPERM, counted pod_quota); steer the forwarder's own
 * upstream (its cookie in mesh_own); steer when nobody listens (fail open).
 * Minimum kernel: 5.8 (the trace ring buffer; bpf_get_netns_cookie 5.7). */
#include "include/steer.h"

int mesh_connect4(struct bpf_sock_addr *ctx)
{
	struct mesh_addr dst;
	int port;

	mesh_addr_from4(&dst, ctx->user_ip4);
	port = mesh_steer(ctx, &dst, bpf_ntohs(ctx->user_port));
	if (port < 0)
		return 0;  /* refused: EPERM */
	if (port) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(port);
	}
	return 1;
}
