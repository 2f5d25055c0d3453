/* SPDX-License-Identifier: GPL-2.0 */
/* sock_ops: when a steered connection is established (the client's active
 * side), move its original destination from the socket-cookie map to the
 * 4-tuple map, keyed by (netns cookie, client address, client port), so the
 * forwarder finds it from the accepted socket's peer; when the client socket
 * closes, move it to mesh_orig_cls (the forwarder may not have accepted it).
 * Any connection of a pod that reaches its forwarder listener (steered or
 * direct) first drops what an earlier connection of the same client tuple
 * left in mesh_orig_cls, so an entry serves only its own connection.
 * With the sk_msg path on, a steered socket also enters mesh_apphash at
 * established (see sk_msg.c). A kernel-mode pod's connection (not steered)
 * is followed from its SYN to its close (include/kernel.h).
 * Must never: affect a socket that was not steered.
 * Minimum kernel: 5.15 (bpf_get_netns_cookie in sock_ops programs). */
#include "include/maps.h"
#include "include/metrics.h"
#include "include/addr.h"
#include "include/trace.h"

static __always_inline void mesh_client_key(struct bpf_sock_ops *skops,
					    struct mesh_tuple *key)
{
	/* Each field is read on its own path: the verifier refuses a context
	 * load through a pointer that the compiler merged across branches. */
	if (skops->family == MESH_AF_INET) {
		__u32 ip4 = skops->local_ip4;

		barrier_var(ip4);
		mesh_addr_from4(&key->addr, ip4);
	} else {
		__u32 a0 = skops->local_ip6[0], a1 = skops->local_ip6[1];
		__u32 a2 = skops->local_ip6[2], a3 = skops->local_ip6[3];

		barrier_var(a3);
		key->addr.a[0] = a0;
		key->addr.a[1] = a1;
		key->addr.a[2] = a2;
		key->addr.a[3] = a3;
	}
	key->port = (__u16)skops->local_port;
}

#include "include/kernel.h"  /* kernel mode: uses mesh_client_key */

/* The sk_msg path (sk_msg.c): the pod's socket into mesh_apphash with a
 * fresh P, and whatever target a socket of the same tuple left is gone. */
static __always_inline void mesh_msg_enter(struct bpf_sock_ops *skops, struct mesh_tuple *key,
					   struct mesh_orig *orig)
{
#if MESH_HAVE_SOCK_HASH_UPDATE_SOCK_OPS
	__u32 on_idx = MESH_STATE_MSG_ON;
	struct mesh_msg_pass pass = {};
	__u64 cookie = orig->cookie, *on;
	long err;

	on = mesh_state.lookup(&on_idx);
	if (!on || !*on)
		return;
	mesh_msg_tgt.delete(key);
	pass.app = cookie;
	if (mesh_msg_pass.update(key, &pass))
		return;
	/* A statement of its own: BCC's rewrite of this call ends in ';'. */
	err = mesh_apphash.sock_hash_update(skops, &cookie, BPF_ANY);
	if (err) {
		mesh_msg_pass.delete(key);
		mesh_count(MESH_REASON_MAP_FULL);
		return;
	}
	orig->flags |= MESH_ORIG_APP;
#endif
}

/* The connection as skops's socket sees it: its own end first (local),
 * then its peer's (remote); swap: the other way round, as the other end
 * sees it. */
static __always_inline void mesh_pair_of(struct bpf_sock_ops *skops, struct mesh_pair *key,
					 int swap)
{
	struct mesh_addr local, remote;
	__u16 lport = (__u16)skops->local_port;
	__u16 rport = bpf_ntohl(skops->remote_port) & 0xffff;

	if (skops->family == MESH_AF_INET) {
		__u32 l4 = skops->local_ip4, r4 = skops->remote_ip4;

		barrier_var(r4);
		mesh_addr_from4(&local, l4);
		mesh_addr_from4(&remote, r4);
	} else {
		__u32 l0 = skops->local_ip6[0], l1 = skops->local_ip6[1];
		__u32 l2 = skops->local_ip6[2], l3 = skops->local_ip6[3];
		__u32 r0 = skops->remote_ip6[0], r1 = skops->remote_ip6[1];
		__u32 r2 = skops->remote_ip6[2], r3 = skops->remote_ip6[3];

		barrier_var(r3);
		local.a[0] = l0;
		local.a[1] = l1;
		local.a[2] = l2;
		local.a[3] = l3;
		remote.a[0] = r0;
		remote.a[1] = r1;
		remote.a[2] = r2;
		remote.a[3] = r3;
	}
	if (swap) {
		key->local = remote;
		key->remote = local;
		key->lport = rport;
		key->rport = lport;
	} else {
		key->local = local;
		key->remote = remote;
		key->lport = lport;
		key->rport = rport;
	}
}

/* The forwarder's upstream socket U, marked for replies straight into the
 * pod (maps.h, mesh_reply), is established: its entry, keyed as the
 * server's end will see it. 1: it was such a socket. */
static __always_inline int mesh_upstream_up(struct bpf_sock_ops *skops, __u64 cookie)
{
#if MESH_HAVE_SOCK_HASH_UPDATE_SOCK_OPS
	struct mesh_reply reply = {};
	struct mesh_pair key = {};

	if (!mesh_upsk.lookup(&cookie))
		return 0;
	mesh_upsk.delete(&cookie);
	mesh_pair_of(skops, &key, 1);
	if (mesh_reply.update(&key, &reply))
		return 1;
	/* Its close drops the entry if Python never named A (mesh_reply_drop). */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	return 1;
#else
	return 0;
#endif
}

/* U closes: its mesh_reply entry goes, unless Python named A in it (then
 * Python reads what went A's way, and drops it, when the pair ends). A
 * connection carried by copy to its end never gets that far. */
static __always_inline void mesh_reply_drop(struct bpf_sock_ops *skops)
{
	struct mesh_pair key = {};
	struct mesh_reply *reply;

	mesh_pair_of(skops, &key, 1);
	reply = mesh_reply.lookup(&key);
	if (reply && !reply->app)
		mesh_reply.delete(&key);
}

/* A server's end V of a connection is established: if the forwarder's
 * upstream socket is its other end (mesh_reply), V enters mesh_apphash, so
 * that its sends meet sk_msg.c (mesh_reply_msg). */
static __always_inline void mesh_server_up(struct bpf_sock_ops *skops)
{
	__u32 on_idx = MESH_STATE_MSG_ON;
	struct mesh_pair key = {};
	__u64 cookie, *on;
	long err = 0;

	on = mesh_state.lookup(&on_idx);
	if (!on || !*on)
		return;
	mesh_pair_of(skops, &key, 0);
	if (!mesh_reply.lookup(&key))
		return;  /* entries are made only where the insert below exists */
	cookie = bpf_get_socket_cookie(skops);
#if MESH_HAVE_SOCK_HASH_UPDATE_SOCK_OPS
	/* A statement of its own: BCC's rewrite of this call ends in ';'. */
	err = mesh_apphash.sock_hash_update(skops, &cookie, BPF_ANY);
#endif
	if (err)
		mesh_count(MESH_REASON_MAP_FULL);
}

/* Is this socket's peer loopback:port (the pod's forwarder listener)? */
static __always_inline int mesh_peer_is_listener(struct bpf_sock_ops *skops, __u16 port)
{
	__u32 rport = skops->remote_port;  /* network order, in the low 16 bits once swapped */
	struct mesh_addr peer;

	if ((__u16)bpf_ntohl(rport) != port)
		return 0;
	if (skops->family == MESH_AF_INET) {
		__u32 ip4 = skops->remote_ip4;

		barrier_var(ip4);
		mesh_addr_from4(&peer, ip4);
	} else {
		__u32 a0 = skops->remote_ip6[0], a1 = skops->remote_ip6[1];
		__u32 a2 = skops->remote_ip6[2], a3 = skops->remote_ip6[3];

		barrier_var(a3);
		peer.a[0] = a0;
		peer.a[1] = a1;
		peer.a[2] = a2;
		peer.a[3] = a3;
	}
	return mesh_addr_is_loopback(&peer);
}

/* A connection of this client tuple to the forwarder listener is being
 * established: whatever mesh_orig_cls holds for the tuple is an earlier
 * connection's (the same 4-tuple cannot be established again while that
 * one's accepted end still exists, and this runs before our ACK, so
 * before the forwarder can accept us). Without this, a direct connect
 * from a port a closed steered connection used, or a steered one whose
 * mesh_orig_tup insert failed, was forwarded to that old destination. */
static __always_inline void mesh_stale_drop(struct mesh_tuple *key)
{
	mesh_orig_cls.delete(key);
}

/* Established and not steered: a direct connect to the pod's own forwarder
 * listener must not inherit an earlier connection's destination. */
static __always_inline void mesh_direct(struct bpf_sock_ops *skops, __u64 netns,
					struct mesh_pod *pod)
{
	struct mesh_tuple key = {};

	if (!mesh_peer_is_listener(skops, pod->port))
		return;
	key.netns = netns;
	mesh_client_key(skops, &key);
	mesh_stale_drop(&key);
}

/* The pod's mesh_orig_tup entries (its share: maps.h), made at its first. */
static __always_inline void mesh_pod_count(__u64 netns, __s64 delta)
{
	__u64 zero = 0, *mine;

	mine = mesh_pod_live.lookup(&netns);
	if (!mine && delta > 0) {
		mesh_pod_live.insert(&netns, &zero);
		mine = mesh_pod_live.lookup(&netns);
	}
	if (mine)
		__sync_fetch_and_add(mine, delta);
}

/* ACTIVE_ESTABLISHED_CB of an attached pod's socket (netns, pod). */
static __always_inline void mesh_rekey(struct bpf_sock_ops *skops, __u64 netns,
				       struct mesh_pod *pod)
{
	__u32 live_idx = MESH_STATE_TUP_LIVE;
	struct mesh_tuple key = {};
	struct mesh_orig *found;
	struct mesh_orig orig;
	__u64 cookie, *live;

	cookie = bpf_get_socket_cookie(skops);
	found = mesh_orig_sk.lookup(&cookie);
	if (!found) {
		if (mesh_upstream_up(skops, cookie))
			return;
		if (!mesh_kernel_up(skops, cookie))  /* by its entry, whatever the pod's mode now */
			mesh_direct(skops, netns, pod);
		return;
	}
	orig = *found;
	mesh_orig_sk.delete(&cookie);
	key.netns = orig.netns;
	mesh_client_key(skops, &key);
	mesh_stale_drop(&key);  /* also when the insert below fails */
	orig.cookie = cookie;
	mesh_msg_enter(skops, &key, &orig);
	if (mesh_orig_tup.update(&key, &orig)) {
		mesh_count(MESH_REASON_MAP_FULL);
		return;
	}
	live = mesh_state.lookup(&live_idx);
	if (live)
		__sync_fetch_and_add(live, 1);
	mesh_pod_count(orig.netns, 1);
	/* OR ours in: other programs' callback flags stay as they were. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	mesh_count(MESH_REASON_REKEYED);
	mesh_event(MESH_EV_ESTABLISHED, MESH_REASON_REKEYED, orig.netns, cookie, &orig.addr,
		   orig.port);
}

/* 1: it was a steered pod socket's. */
static __always_inline int mesh_forget(struct bpf_sock_ops *skops)
{
	__u32 live_idx = MESH_STATE_TUP_LIVE;
	struct mesh_tuple key = {};
	struct mesh_orig *found;
	struct mesh_orig orig;
	__u64 *live;

	key.netns = bpf_get_netns_cookie(skops);
	mesh_client_key(skops, &key);
	found = mesh_orig_tup.lookup(&key);
	if (!found)
		return 0;
	orig = *found;
	mesh_msg_pass.delete(&key);  /* the sk_msg path's state of this socket */
	mesh_msg_tgt.delete(&key);
	mesh_orig_cls.update(&key, &orig);  /* the forwarder may not have accepted yet */
	if (mesh_orig_tup.delete(&key))
		return 1;
	live = mesh_state.lookup(&live_idx);
	if (live)
		__sync_fetch_and_add(live, -1);
	mesh_pod_count(key.netns, -1);
	mesh_count(MESH_REASON_CLOSED);
	mesh_event(MESH_EV_CLOSED, MESH_REASON_CLOSED, key.netns, bpf_get_socket_cookie(skops),
		   &key.addr, key.port);
	return 1;
}

int mesh_sockops(struct bpf_sock_ops *skops)
{
	struct mesh_pod *pod;
	__u64 netns;

#if MESH_TEST_REFUSE
	bpf_sk_redirect_hash((void *)skops, (void *)0, (void *)0, 0);
#endif

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		/* Every connect of every socket under the attach point comes here
		 * (on a node: all of its TCP): one lookup in the small pod table
		 * sends away all but the attached pods' own, before any lookup in
		 * the large per-connection maps (a pod detached meanwhile: its
		 * connect hook's entries are LRU). */
		netns = bpf_get_netns_cookie(skops);
		pod = mesh_pods.lookup(&netns);
		if (!pod)
			break;
		if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
			mesh_rekey(skops, netns, pod);
		else
			mesh_kernel_syn(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		mesh_server_up(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (!mesh_kernel_state(skops) && skops->args[1] == BPF_TCP_CLOSE) {
			if (!mesh_forget(skops))
				mesh_reply_drop(skops);
		}
		break;
	}
	return 1;
}
