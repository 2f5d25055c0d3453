/* SPDX-License-Identifier: GPL-2.0 */
/* The connect-time decision shared by connect4.c and connect6.c. */
#ifndef MESH_STEER_H
#define MESH_STEER_H

#include "maps.h"
#include "metrics.h"
#include "addr.h"

#ifndef BPF_F_CURRENT_NETNS
#define BPF_F_CURRENT_NETNS (-1L)
#endif

/* Is the pod's forwarder listening on loopback:port in this netns?
 * mapped: look on 127.0.0.1, else on ::1. */
static __always_inline int mesh_listener_up(struct bpf_sock_addr *ctx, __u16 port, int v4)
{
#if MESH_CHECK_LISTENER
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;

	if (v4) {
		tuple.ipv4.daddr = bpf_htonl(0x7f000001);
		tuple.ipv4.dport = bpf_htons(port);
		sk = bpf_sk_lookup_tcp(ctx, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	} else {
		tuple.ipv6.daddr[3] = bpf_htonl(1);
		tuple.ipv6.dport = bpf_htons(port);
		sk = bpf_sk_lookup_tcp(ctx, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
	}
	if (!sk)
		return 0;
	bpf_sk_release(sk);
#endif
	return 1;
}

/* Decide whether to steer this connect(); on yes, store the original
 * destination by socket cookie and return the pod's listener port.
 * Returns 0 when the connect must go direct. Never fails a connect. */
static __always_inline __u16 mesh_steer(struct bpf_sock_addr *ctx,
					const struct mesh_addr *dst, __u16 dport)
{
	struct mesh_lpm_key lpm = {};
	struct mesh_orig orig = {};
	struct mesh_pod *pod;
	__u32 live_idx = MESH_STATE_TUP_LIVE;
	__u64 netns, cookie, *live;

	if (ctx->type != MESH_SOCK_STREAM || ctx->protocol != MESH_IPPROTO_TCP) {
		mesh_count(MESH_REASON_NOT_TCP, MESH_DIR_EGRESS);
		return 0;
	}
	netns = bpf_get_netns_cookie(ctx);
	pod = mesh_pods.lookup(&netns);
	if (!pod) {
		mesh_count(MESH_REASON_NOT_ATTACHED, MESH_DIR_EGRESS);
		return 0;
	}
	cookie = bpf_get_socket_cookie(ctx);
	if (mesh_own.lookup(&cookie)) {
		mesh_own.delete(&cookie);
		mesh_count(MESH_REASON_OWN_SOCKET, MESH_DIR_EGRESS);
		return 0;
	}
	if (mesh_addr_is_loopback(dst)) {
		mesh_count(MESH_REASON_LOOPBACK, MESH_DIR_EGRESS);
		return 0;
	}
	if (mesh_excl_port.lookup(&dport)) {
		mesh_count(MESH_REASON_EXCL_PORT, MESH_DIR_EGRESS);
		return 0;
	}
	lpm.prefixlen = 128;
	lpm.addr = *dst;
	if (mesh_excl_cidr.lookup(&lpm)) {
		mesh_count(MESH_REASON_EXCL_CIDR, MESH_DIR_EGRESS);
		return 0;
	}
	if (!mesh_listener_up(ctx, pod->port, mesh_addr_is_mapped(dst))) {
		mesh_count(MESH_REASON_NO_LISTENER, MESH_DIR_EGRESS);
		return 0;
	}
	live = mesh_state.lookup(&live_idx);
	if (!live || *live >= MESH_CONNS_MAX - 8) {
		mesh_count(MESH_REASON_MAP_FULL, MESH_DIR_EGRESS);
		return 0;
	}
	orig.addr = *dst;
	orig.port = dport;
	orig.pod_id = pod->pod_id;
	orig.netns = netns;
	if (mesh_orig_sk.update(&cookie, &orig)) {
		mesh_count(MESH_REASON_MAP_FULL, MESH_DIR_EGRESS);
		return 0;
	}
	mesh_dbg("mesh: steer pod %u port %u\n", pod->pod_id, dport);
	mesh_count(MESH_REASON_STEERED, MESH_DIR_EGRESS);
	return pod->port;
}

#endif /* MESH_STEER_H */
