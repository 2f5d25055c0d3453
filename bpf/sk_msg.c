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

/* A's stream: the bytes it has put into its own TCP (acked, plus sent or
 * queued and not acked), exact whatever became of earlier messages. A
 * connected, so its bytes_acked counts its SYN too (1 on a connection that
 * has sent nothing: measured on 6.18; an accepted socket's starts at 0).
 * A is locked while this runs (tcp_bpf_sendmsg), so its ACKs wait in its
 * backlog. 0 when the offsets or A's tcp_sock are not there. */
static __always_inline int mesh_app_stream(struct sk_msg_md *msg, __u64 *stream)
{
	struct bpf_sock *sk = msg->sk;
	__u64 acked;
	void *tp;

	if (MESH_TCP_BYTES_ACKED == 0 || MESH_TCP_WRITE_SEQ == 0 || !sk)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	acked = *(__u64 *)(tp + MESH_TCP_BYTES_ACKED);
	if (acked == 0)
		return 0;  /* no SYN counted: not the kernel this was measured on */
	*stream = acked - 1 + (__u32)(*(__u32 *)(tp + MESH_TCP_WRITE_SEQ) -
				      *(__u32 *)(tp + MESH_TCP_SND_UNA));
	return 1;
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
	if (!pass) {
		mesh_count(MESH_REASON_UNTRACKED);
		return SK_PASS;  /* no P (evicted, or A closing): never redirect */
	}
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
