/* SPDX-License-Identifier: GPL-2.0 */
/* sk_skb stream verdict on mesh_sockhash: splice a forwarded connection's
 * two sockets in the kernel, with an ordered hand-off from Python.
 *
 * Per socket, X (mesh_passed) counts bytes this program passed to the
 * socket's own queue, Y (mesh_sent) bytes Python read from it and fully sent
 * on. The program adds len to X first, then reads Y: only if a peer is set
 * and the old X equals Y (Python has delivered everything passed so far) is
 * the segment redirected to the peer's egress, and len taken back off X.
 * Otherwise it passes, and Python forwards it in order.
 * X is created here on a socket's first segment, Y by Python on its first
 * store; a missing Y reads as 0. Only the forwarder puts sockets into
 * mesh_sockhash, so every socket seen here is one of its own.
 * Must never: reorder bytes, redirect a zero-length skb (a FIN: the psock
 * backlog treats a 0-byte delivery as an error), or drop data; every
 * failure passes the segment to Python.
 * Minimum kernel: 5.12 (atomic fetch-and-add); sockhash verdict 4.18. */
#include "include/maps.h"
#include "include/metrics.h"

int mesh_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	__u64 len = skb->len;
	__u64 *passed, *sent, *peer;
	__u64 before, zero = 0, y;

	if (len == 0) {
		mesh_count(MESH_REASON_EOF_DROP);
		return SK_DROP;
	}
	passed = mesh_passed.lookup(&cookie);
	if (!passed) {
		mesh_passed.update(&cookie, &zero);
		passed = mesh_passed.lookup(&cookie);
	}
	if (!passed) {
		mesh_count(MESH_REASON_UNTRACKED);
		return SK_PASS;  /* map full: Python reads it all (X stays unknown) */
	}
	before = __sync_fetch_and_add(passed, len);
	sent = mesh_sent.lookup(&cookie);
	y = sent ? *sent : 0;
	peer = mesh_peer.lookup(&cookie);
	if (!peer || before != y) {
		mesh_count(MESH_REASON_HANDOFF);
		return SK_PASS;
	}
	if (mesh_sockhash.sk_redirect_hash(skb, peer, 0) != SK_PASS) {
		mesh_count(MESH_REASON_REDIR_FAIL);
		return SK_PASS;
	}
	__sync_fetch_and_add(passed, -len);
	mesh_count(MESH_REASON_SPLICED);
	return SK_PASS;
}
