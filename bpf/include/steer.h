/* SPDX-License-Identifier: GPL-2.0 */
/* The connect-time decision shared by connect4.c and connect6.c. */
#ifndef MESH_STEER_H
#define MESH_STEER_H

#include "maps.h"
#include "metrics.h"
#include "addr.h"
#include "trace.h"
#include "policy.h"

/* Is this agent's listener for the pod up? Only a socket the forwarder put
 * into mesh_lsn4/mesh_lsn6 counts (any other listener on the port in the
 * pod's netns is the pod's own); v4: the IPv4 one, else the IPv6 one. */
static __always_inline int mesh_listener_up(__u64 netns, int v4)
{
#if MESH_CHECK_LISTENER
	struct bpf_sock *sk;

	if (v4)
		sk = (struct bpf_sock *)mesh_lsn4.lookup(&netns);
	else
		sk = (struct bpf_sock *)mesh_lsn6.lookup(&netns);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
#endif
	return 1;
}

/* Count the decision and tell a tracer (with the calling process where the
 * kernel lets sock_addr programs see it, and the policy rule that refused
 * it); 0: the connect goes direct. */
static __always_inline __u16 mesh_decided_by(__u8 reason, __u32 rule, __u64 netns, __u64 cookie,
					     const struct mesh_addr *dst, __u16 dport)
{
	struct mesh_event ev = {};

	mesh_count(reason);
	if (!mesh_tracing(netns, dport))
		return 0;
	mesh_event_fill(&ev, MESH_EV_CONNECT, reason, netns, cookie, dst, dport);
	ev.rule = rule;
#if MESH_HAVE_CURRENT_TASK_SOCK_ADDR
	ev.pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
#endif
	mesh_events.ringbuf_output(&ev, sizeof(ev), 0);
	return 0;
}

static __always_inline __u16 mesh_decided(__u8 reason, __u64 netns, __u64 cookie,
					  const struct mesh_addr *dst, __u16 dport)
{
	return mesh_decided_by(reason, 0, netns, cookie, dst, dport);
}

/* Kernel mode: the connect goes direct and is remembered for sock_ops
 * (kernel.h); 0 whatever happens. A full map leaves the connection direct
 * and unaccounted (map_full). */
static __always_inline int mesh_kernel_conn(__u64 netns, __u64 cookie, const struct mesh_pod *pod,
					    const struct mesh_addr *dst, __u16 dport)
{
	struct mesh_kconn conn = {};

	conn.started = bpf_ktime_get_ns();
	conn.netns = netns;
	conn.addr = *dst;
	conn.port = dport;
	conn.pod_id = pod->pod_id;
	if (mesh_kconn.update(&cookie, &conn))
		return mesh_decided(MESH_REASON_MAP_FULL, netns, cookie, dst, dport);
	return mesh_decided(MESH_REASON_KERNEL, netns, cookie, dst, dport);
}

/* Is the pod past its share of mesh_orig_tup while the map is half full or
 * more (maps.h)? Then its connect is refused: going direct would let a pod
 * leave the mesh by its own doing. No share (not set yet): no. */
static __always_inline int mesh_over_share(__u64 netns, __u64 live)
{
	__u64 *share, *mine;

	if (live < MESH_CONNS_MAX / 2)
		return 0;
	share = mesh_pod_share.lookup(&netns);
	mine = mesh_pod_live.lookup(&netns);
	return share && mine && (__s64)*mine >= (__s64)*share;  /* signed: a drift below 0 is 0 */
}

/* Decide whether to steer this connect(); on yes, store the original
 * destination by socket cookie and return the pod's listener port.
 * Returns 0 when the connect must go direct, -1 when it is refused (a
 * policy denies it, or the pod is over its share). Fails no connect for
 * any other reason. The policy is checked before the exclusions and the
 * fail-open cases: a denied destination stays denied whichever way the
 * connection would have gone. */
static __always_inline int mesh_steer(struct bpf_sock_addr *ctx,
				      const struct mesh_addr *dst, __u16 dport)
{
	struct mesh_lpm_key lpm = {};
	struct mesh_orig orig = {};
	struct mesh_pod *pod;
	__u8 *excl, *own;
	__u32 live_idx = MESH_STATE_TUP_LIVE;
	__u64 netns, cookie, *live;
	__u32 rule;

	netns = bpf_get_netns_cookie(ctx);
	cookie = bpf_get_socket_cookie(ctx);
	if (ctx->type != MESH_SOCK_STREAM || ctx->protocol != MESH_IPPROTO_TCP)
		return mesh_decided(MESH_REASON_NOT_TCP, netns, cookie, dst, dport);
	pod = mesh_pods.lookup(&netns);
	if (!pod)
		return mesh_decided(MESH_REASON_NOT_ATTACHED, netns, cookie, dst, dport);
	own = mesh_own.lookup(&cookie);
	if (own) {
		if (*own == MESH_OWN_REPLIES) {
			__u8 one = 1;

			mesh_upsk.update(&cookie, &one);  /* sock_ops takes it at established */
		}
		mesh_own.delete(&cookie);
		return mesh_decided(MESH_REASON_OWN_SOCKET, netns, cookie, dst, dport);
	}
	if (mesh_addr_is_loopback(dst))
		return mesh_decided(MESH_REASON_LOOPBACK, netns, cookie, dst, dport);
	if (!mesh_policy_allows(netns, dst, dport, &rule)) {
		mesh_decided_by(MESH_REASON_DENIED_POLICY, rule, netns, cookie, dst, dport);
		return -1;
	}
	if (mesh_excl_port.lookup(&dport))
		return mesh_decided(MESH_REASON_EXCL_PORT, netns, cookie, dst, dport);
	lpm.prefixlen = 128;
	lpm.addr = *dst;
	excl = mesh_excl_cidr.lookup(&lpm);
	if (excl && *excl)  /* 0: a hole, e.g. ::ffff:0:0/96 under ::/0 (ebpf.py) */
		return mesh_decided(MESH_REASON_EXCL_CIDR, netns, cookie, dst, dport);
	/* A kernel-mode pod: direct, unless the forwarder has work to do for
	 * this destination (mesh_kfwd). */
	if ((pod->flags & MESH_POD_KERNEL) && !mesh_kfwd.lookup(&lpm))
		return mesh_kernel_conn(netns, cookie, pod, dst, dport);
	if (!mesh_listener_up(netns, mesh_addr_is_mapped(dst)))
		return mesh_decided(MESH_REASON_NO_LISTENER, netns, cookie, dst, dport);
	live = mesh_state.lookup(&live_idx);
	if (!live || *live >= MESH_CONNS_MAX - 8)
		return mesh_decided(MESH_REASON_MAP_FULL, netns, cookie, dst, dport);
	if (mesh_over_share(netns, *live)) {
		mesh_decided(MESH_REASON_POD_QUOTA, netns, cookie, dst, dport);
		return -1;
	}
	orig.addr = *dst;
	orig.port = dport;
	orig.pod_id = pod->pod_id;
	orig.netns = netns;
	if (mesh_orig_sk.update(&cookie, &orig))
		return mesh_decided(MESH_REASON_MAP_FULL, netns, cookie, dst, dport);
	mesh_dbg("mesh: steer pod %u port %u\n", pod->pod_id, dport);
	mesh_decided(MESH_REASON_STEERED, netns, cookie, dst, dport);
	return pod->port;
}

#endif /* MESH_STEER_H */
