/* SPDX-License-Identifier: GPL-2.0 */
/* sk_msg verdict on mesh_apphash: a pod's sendmsg on a steered connection
 * goes straight to the upstream socket's egress, in the sender's own
 * context (no loopback hop to the forwarder, no psock worker).
 *
 * The pod's socket A counts in P (mesh_msg_pass, made by sock_ops at
 * established) the bytes it passed to its own TCP: those reach the
 * forwarder's accepted socket, and Python sends them on and stores that
 * socket's Y. A message is redirected only if Python has set the target
 * for this very socket and the old P equals Y: every byte passed before
 * is already in the upstream's send queue, so the redirected ones follow
 * them. Then len is taken back off P. Otherwise the message passes (and
 * keeps its claim, also when the redirect fails) and Python forwards it.
 * P is read from A's tcp_sock where the kernel's BTF gives the offsets
 * (mesh_app_stream): counted here it drifts, because when pushing a passed
 * message into A's own TCP fails part way (A's send buffer full) the
 * kernel keeps the PASS verdict for A's next message and passes it without
 * running this program. That message went uncounted, P fell behind A's
 * stream, and a later redirect overtook bytes Python had not carried yet
 * (the echo test in tests/integration/test_backpressure.py, about 1 run in
 * 3 in the 6.12 guest: up to 64 KiB out of place, the count right).
 * Must never: reorder or drop bytes (every failure passes), redirect into
 * another connection (the target names A's cookie, P knows whose it is).
 * Minimum kernel: 5.15 (bpf_get_netns_cookie in sk_msg programs). */
#include "include/maps.h"
#include "include/metrics.h"
#include "include/addr.h"

/* A socket's TCP stream from its own tcp_sock: the bytes it has put into
 * its TCP (bytes_acked, plus sent or queued and not acked), less syn (1
 * for a socket that connected: its bytes_acked counts its SYN; 0 for an
 * accepted one). 0: not known. */
static __always_inline int mesh_stream_of(struct bpf_sock *sk, __u64 syn, __u64 *stream)
{
	__u64 acked;
	void *tp;

	if (MESH_TCP_BYTES_ACKED == 0 || MESH_TCP_WRITE_SEQ == 0 || !sk)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	acked = *(__u64 *)(tp + MESH_TCP_BYTES_ACKED);
	if (acked < syn)
		return 0;
	*stream = acked - syn + (__u32)(*(__u32 *)(tp + MESH_TCP_WRITE_SEQ) -
					*(__u32 *)(tp + MESH_TCP_SND_UNA));
	return 1;
}

/* A's stream: the bytes it has put into its own TCP (acked, plus sent or
 * queued and not acked), exact whatever became of earlier messages. A
 * connected, so its bytes_acked counts its SYN too (1 on a connection that
 * has sent nothing: measured on 6.18; an accepted socket's starts at 0:
 * none counted means not the kernel this was measured on). A is locked
 * while this runs (tcp_bpf_sendmsg), so its ACKs wait in its backlog. 0
 * when the offsets or A's tcp_sock are not there. */
static __always_inline int mesh_app_stream(struct sk_msg_md *msg, __u64 *stream)
{
	return mesh_stream_of(msg->sk, 1, stream);
}

/* A sends (the request of a request/response, typically): arm its
 * server's replies for A's receive queue if every byte of V's TCP stream
 * that V last reported has reached A (bytes_received: the forwarder relays
 * V's stream to A byte for byte) and A's application has read all A
 * received by TCP (copied_seq == rcv_nxt: A's recvmsg reads its psock
 * queue first, so nothing there may be newer than a byte in A's TCP
 * queue). A stale report only keeps it unarmed: V checks its own stream
 * against what A armed at. The budget is A's free receive memory. */
static __always_inline void mesh_reply_arm(struct sk_msg_md *msg, __u64 app)
{
	struct mesh_rarm *arm;
	struct bpf_sock *sk = msg->sk;
	__u64 rcvd, seen;
	__u32 nxt, copied;
	int rmem, rcvbuf;
	void *tp;

	if (MESH_TCP_BYTES_RECEIVED == 0 || MESH_TCP_RCV_NXT == 0 || MESH_SK_RMEM_ALLOC == 0 ||
	    MESH_SK_RCVBUF == 0 || MESH_TCP_COPIED_SEQ == 0 || !sk)
		return;
	arm = mesh_rarm.lookup(&app);
	if (!arm)
		return;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return;
	rcvd = *(__u64 *)(tp + MESH_TCP_BYTES_RECEIVED);
	nxt = *(__u32 *)(tp + MESH_TCP_RCV_NXT);
	copied = *(__u32 *)(tp + MESH_TCP_COPIED_SEQ);
	rmem = *(int *)(tp + MESH_SK_RMEM_ALLOC);
	rcvbuf = *(int *)(tp + MESH_SK_RCVBUF);
	seen = arm->v_stream;
	if (rcvd != seen || nxt != copied || rmem >= rcvbuf)
		return;
	arm->budget = rcvbuf - rmem;
	arm->armed = seen;  /* after the budget: V reads armed first */
}

/* A send of the server's socket V (not a pod's: no P for it). */
static __always_inline int mesh_reply_msg(struct sk_msg_md *msg)
{
	struct mesh_pair key = {};
	struct mesh_reply *reply;
	struct mesh_rarm *arm;
	__u64 app, stream = 0, len = msg->size;
	__s64 left;

	if (msg->family == MESH_AF_INET) {
		__u32 l4 = msg->local_ip4, r4 = msg->remote_ip4;

		barrier_var(r4);
		mesh_addr_from4(&key.local, l4);
		mesh_addr_from4(&key.remote, r4);
	} else {
		__u32 l0 = msg->local_ip6[0], l1 = msg->local_ip6[1];
		__u32 l2 = msg->local_ip6[2], l3 = msg->local_ip6[3];
		__u32 r0 = msg->remote_ip6[0], r1 = msg->remote_ip6[1];
		__u32 r2 = msg->remote_ip6[2], r3 = msg->remote_ip6[3];

		barrier_var(r3);
		key.local.a[0] = l0;
		key.local.a[1] = l1;
		key.local.a[2] = l2;
		key.local.a[3] = l3;
		key.remote.a[0] = r0;
		key.remote.a[1] = r1;
		key.remote.a[2] = r2;
		key.remote.a[3] = r3;
	}
	key.lport = (__u16)msg->local_port;
	key.rport = bpf_ntohl(msg->remote_port) & 0xffff;
	reply = mesh_reply.lookup(&key);
	if (!reply) {
		mesh_count(MESH_REASON_UNTRACKED);
		return SK_PASS;
	}
	app = reply->app;
	arm = app ? mesh_rarm.lookup(&app) : 0;
	if (!arm || !mesh_stream_of(msg->sk, 0, &stream)) {
		mesh_count(MESH_REASON_REPLY_HELD);
		return SK_PASS;  /* A not named yet, or V's stream unknown */
	}
	if (arm->armed == stream) {
		left = __sync_fetch_and_add(&arm->budget, -(__s64)len);
		if (left >= (__s64)len) {
			if (mesh_apphash.msg_redirect_hash(msg, &app, BPF_F_INGRESS) == SK_PASS) {
				__sync_fetch_and_add(&reply->ingress, len);
				mesh_count(MESH_REASON_MSG_INGRESS);
				return SK_PASS;
			}
			mesh_count(MESH_REASON_REDIR_FAIL);
		} else {
			mesh_count(MESH_REASON_REPLY_HELD);
		}
		__sync_fetch_and_add(&arm->budget, (__s64)len);
	} else {
		mesh_count(MESH_REASON_REPLY_HELD);
	}
	/* The TCP path: V's stream moves past what A armed at (no reply goes
	 * A's way again until A arms once more). */
	arm->v_stream = stream + len;
	return SK_PASS;
}

int mesh_msg(struct sk_msg_md *msg)
{
	struct mesh_tuple key = {};
	struct mesh_msg_pass *pass;
	struct mesh_msg_tgt *tgt;
	__u64 len = msg->size;
	__u64 before, y, upstream, *sent, stream = 0;

	key.netns = bpf_get_netns_cookie(msg);
	if (msg->family == MESH_AF_INET) {
		__u32 ip4 = msg->local_ip4;

		barrier_var(ip4);
		mesh_addr_from4(&key.addr, ip4);
	} else {
		__u32 a0 = msg->local_ip6[0], a1 = msg->local_ip6[1];
		__u32 a2 = msg->local_ip6[2], a3 = msg->local_ip6[3];

		barrier_var(a3);
		key.addr.a[0] = a0;
		key.addr.a[1] = a1;
		key.addr.a[2] = a2;
		key.addr.a[3] = a3;
	}
	key.port = (__u16)msg->local_port;
	pass = mesh_msg_pass.lookup(&key);
	if (!pass)  /* a server's socket, or no P (evicted, or A closing): never this way */
		return mesh_reply_msg(msg);
	before = __sync_fetch_and_add(&pass->passed, len);
	if (mesh_app_stream(msg, &stream) && stream != before) {
		/* The counter missed a send (or counted one the kernel cut short):
		 * the stream decides; the counter starts again from it. */
		mesh_count(MESH_REASON_MSG_DRIFT);
		pass->passed = stream + len;
		before = stream;
	}
	tgt = mesh_msg_tgt.lookup(&key);
	if (!tgt || tgt->app != pass->app) {
		mesh_count(MESH_REASON_HANDOFF);
		return SK_PASS;
	}
	mesh_reply_arm(msg, tgt->app);
	upstream = tgt->upstream;
	sent = mesh_sent.lookup(&tgt->via);
	y = sent ? *sent : 0;
	if (before != y) {
		mesh_count(MESH_REASON_HANDOFF);
		return SK_PASS;
	}
	if (mesh_sockhash.msg_redirect_hash(msg, &upstream, 0) != SK_PASS) {
		mesh_count(MESH_REASON_REDIR_FAIL);
		return SK_PASS;
	}
	__sync_fetch_and_add(&pass->passed, -len);
	mesh_count(MESH_REASON_MSG_SPLICED);
	return SK_PASS;
}
