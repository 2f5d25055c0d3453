/* SPDX-License-Identifier: GPL-2.0 */
/* Kernel mode, sock_ops's part: a pod whose connects need nothing from
 * the forwarder. The connect hook lets them go direct (steer.h: after the
 * policy's decision) and keeps when and where in mesh_kconn; from here
 * sock_ops follows the connection to its close and hands the agent one
 * record (mesh_kdone): bytes each way, when, whose FIN came first, how it
 * ended. Included by sockops.c after mesh_client_key. */
#ifndef MESH_KERNEL_H
#define MESH_KERNEL_H

#include "maps.h"
#include "metrics.h"
#include "addr.h"
#include "trace.h"

/* enum sock_flags in include/net/sock.h: SOCK_DEAD, SOCK_DONE, ... (set by
 * tcp_fin() alone among TCP's paths: the peer's FIN was taken in). */
#define MESH_SOCK_DONE 1

static __always_inline void mesh_klive_add(__u64 netns, __s64 delta)
{
	__s64 zero = 0, *live;

	live = mesh_klive.lookup(&netns);
	if (!live && delta > 0) {
		mesh_klive.insert(&netns, &zero);
		live = mesh_klive.lookup(&netns);
	}
	if (live)
		__sync_fetch_and_add(live, delta);
}

/* TCP_CONNECT_CB (the SYN goes out): a kernel-mode socket asks for its
 * state changes from here, so a failed connect is seen too. */
static __always_inline void mesh_kernel_syn(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);

	if (mesh_kconn.lookup(&cookie))
		bpf_sock_ops_cb_flags_set(skops,
					  skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* ACTIVE_ESTABLISHED_CB: 1 if the socket is a kernel-mode one. */
static __always_inline int mesh_kernel_up(struct bpf_sock_ops *skops, __u64 cookie)
{
	struct mesh_kconn *conn = mesh_kconn.lookup(&cookie);

	if (!conn)
		return 0;
	conn->flags |= MESH_KC_UP;
	mesh_klive_add(conn->netns, 1);
	mesh_event(MESH_EV_ESTABLISHED, MESH_REASON_KERNEL, conn->netns, cookie, &conn->addr,
		   conn->port);
	return 1;
}

/* One record into mesh_kdone, waking the agent only once a batch waits
 * (it reads the ring a few times a second anyway). */
static __always_inline void mesh_kdone_put(struct mesh_kdone *done)
{
	__u32 out_idx = MESH_STATE_KDONE_OUT, read_idx = MESH_STATE_KDONE_READ;
	__u64 *out = mesh_state.lookup(&out_idx), *read = mesh_state.lookup(&read_idx);
	__u64 flags = BPF_RB_NO_WAKEUP;

	if (!out || !read)
		return;
	if (*out - *read + 1 >= MESH_KDONE_WAKE)
		flags = BPF_RB_FORCE_WAKEUP;
	if (mesh_kdone.ringbuf_output(done, sizeof(*done), flags)) {
		mesh_count(MESH_REASON_ACCT_LOST);
		return;
	}
	__sync_fetch_and_add(out, 1);
}

/* The close: one record for the agent. bytes_acked counts the SYN (1)
 * and, once acked, the FIN; bytes_received counts the peer's FIN once
 * taken in. Those come off, read from the socket itself where the kernel
 * lets sock_ops reach its tcp_sock (else from the states seen). */
static __always_inline void mesh_kernel_done(struct bpf_sock_ops *skops, __u64 cookie,
					     struct mesh_kconn *conn, __u32 last)
{
	struct mesh_kdone done = {};
	struct mesh_tuple key = {};
	__u64 acked = skops->bytes_acked, rcvd = skops->bytes_received;
	__u32 una = skops->snd_una, nxt = skops->snd_nxt;
	__u8 flags = conn->flags;

#if MESH_HAVE_SKC_TO_TCP_SOCK_SOCK_OPS
	if (MESH_SK_FLAGS != 0 && MESH_SK_ERR != 0 && MESH_TCP_WRITE_SEQ != 0) {
		struct bpf_sock *sk = skops->sk;
		void *tp = sk ? bpf_skc_to_tcp_sock(sk) : 0;

		if (tp) {
			if ((*(__u64 *)(tp + MESH_SK_FLAGS) >> MESH_SOCK_DONE) & 1)
				flags |= MESH_KC_FIN_IN;
			done.err = *(int *)(tp + MESH_SK_ERR);
			nxt = *(__u32 *)(tp + MESH_TCP_WRITE_SEQ);  /* the FIN, sent or not */
			flags |= MESH_KC_EXACT;
		}
	}
#endif
	if (flags & MESH_KC_UP) {
		acked -= acked > 0;  /* the SYN */
		if ((flags & MESH_KC_FIN_OUT) && una == nxt && acked > 0)
			acked -= 1;  /* the FIN, acked */
		if ((flags & MESH_KC_FIN_IN) && rcvd > 0)
			rcvd -= 1;
		done.sent = acked;
		done.rcvd = rcvd;
		mesh_klive_add(conn->netns, -1);
	}
	done.netns = conn->netns;
	done.cookie = cookie;
	done.started = conn->started;
	done.ended = bpf_ktime_get_ns();
	done.addr = conn->addr;
	done.port = conn->port;
	done.pod_id = conn->pod_id;
	done.flags = flags;
	done.closer = conn->closer;
	done.last = last;
	mesh_client_key(skops, &key);
	done.src = key.addr;
	done.sport = key.port;
	mesh_kdone_put(&done);
	mesh_event(MESH_EV_CLOSED, MESH_REASON_KERNEL, conn->netns, cookie, &conn->addr,
		   conn->port);
	mesh_kconn.delete(&cookie);
}

/* STATE_CB: 1 if the socket is a kernel-mode one (its state followed). */
static __always_inline int mesh_kernel_state(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct mesh_kconn *conn = mesh_kconn.lookup(&cookie);
	__u32 old = skops->args[0], new = skops->args[1];

	if (!conn)
		return 0;
	if (new == BPF_TCP_FIN_WAIT1 || new == BPF_TCP_LAST_ACK)
		conn->flags |= MESH_KC_FIN_OUT;
	if (new == BPF_TCP_CLOSE_WAIT || new == BPF_TCP_CLOSING)
		conn->flags |= MESH_KC_FIN_IN;
	if (!conn->closer) {
		if (new == BPF_TCP_FIN_WAIT1)
			conn->closer = MESH_KC_BY_POD;
		else if (new == BPF_TCP_CLOSE_WAIT)
			conn->closer = MESH_KC_BY_PEER;
	}
	if (new == BPF_TCP_CLOSE)
		mesh_kernel_done(skops, cookie, conn, old);
	return 1;
}

#endif /* MESH_KERNEL_H */
