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
 * Must never: reorder or drop bytes (every failure passes), redirect into
 * another connection (the target names A's cookie, P knows whose it is).
 * Minimum kernel: 5.15 (bpf_get_netns_cookie in sk_msg programs). */
#include "include/maps.h"
#include "include/metrics.h"
#include "include/addr.h"

int mesh_msg(struct sk_msg_md *msg)
{
	struct mesh_tuple key = {};
	struct mesh_msg_pass *pass;
	struct mesh_msg_tgt *tgt;
	__u64 len = msg->size;
	__u64 before, y, upstream, *sent;

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
