/* SPDX-License-Identifier: GPL-2.0 */
/* cgroup/connect6: the IPv6 twin of connect4.c. A destination given as
 * IPv4-mapped (::ffff:a.b.c.d, a dual-stack socket reaching IPv4) is steered
 * to ::ffff:127.0.0.1, the IPv4 listener; any other to [::1]:<port>.
 * Must never: fail a connect (but a pod's over its share: EPERM), steer the
 * forwarder's upstream (mesh_own), steer when nobody listens. Minimum kernel: 5.8. */
#include "include/steer.h"

int mesh_connect6(struct bpf_sock_addr *ctx)
{
	struct mesh_addr dst;
	int port;

	dst.a[0] = ctx->user_ip6[0];
	dst.a[1] = ctx->user_ip6[1];
	dst.a[2] = ctx->user_ip6[2];
	dst.a[3] = ctx->user_ip6[3];
	port = mesh_steer(ctx, &dst, bpf_ntohs(ctx->user_port));
	if (port < 0)
		return 0;  /* refused: EPERM */
	if (!port)
		return 1;
	if (mesh_addr_is_mapped(&dst)) {
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(port);
	return 1;
}
