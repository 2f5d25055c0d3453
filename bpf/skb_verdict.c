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
 * Back-pressure: a redirect is held back (passed, and Python told through
 * mesh_wake) while the bytes on their way to the peer's other end are at
 * MESH_FLIGHT_MAX (mesh_over_budget; the formula is in maps.h), and while
 * the peer is itself passing (mesh_peer_passing).
 * Must never: reorder bytes, redirect a zero-length skb (a FIN: the psock
 * backlog treats a 0-byte delivery as an error), or drop data; every
 * failure passes the segment to Python. The one drop of new bytes
 * (mesh_fresh: repeated bytes that cannot be cut off) ends the stream
 * there, and the forwarder resets the connection.
 * Minimum kernel: 5.12 (atomic fetch-and-add); sockhash verdict 4.18. */
#include "include/maps.h"
#include "include/metrics.h"

/* Hold back (pass) instead of redirecting len more bytes to the peer T?
 * Yes when the bytes on their way to T's other end, not acked yet, are at
 * the budget (R + B - T's bytes_acked, see mesh_redir in maps.h), or when
 * T's send queue could not take what waits in T's psock queue plus these
 * at once. The second keeps the psock worker from ever waiting on T: while
 * it waits, whatever T's own verdict passes queues behind it, uncharged to
 * T's receive buffer, and T's window never closes (measured on 6.18: a pod
 * that stopped reading replies sent 124 MB into it). Only asked when the
 * segment would be redirected (X == Y). Any lookup failing: no. */
static __always_inline int mesh_over_budget(__u64 cookie, __u64 *peer, __u64 len)
{
	__u64 *base, *redir, acked = 0, stream = 0, backlog, need;
	__s64 wmem = 0, sndbuf = 0;
	struct bpf_sock *sk;
	void *tp;

	if (MESH_TCP_BYTES_ACKED == 0 || MESH_SK_SNDBUF == 0)
		return 0;
	base = mesh_flight.lookup(&cookie);
	if (!base)
		return 0;
	sk = (struct bpf_sock *)mesh_sockhash.lookup(peer);
	if (!sk)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (tp) {
		acked = *(__u64 *)(tp + MESH_TCP_BYTES_ACKED);
		stream = acked + (__u32)(*(__u32 *)(tp + MESH_TCP_WRITE_SEQ) -
					 *(__u32 *)(tp + MESH_TCP_SND_UNA));
		wmem = *(int *)(tp + MESH_SK_WMEM_QUEUED);
		sndbuf = *(int *)(tp + MESH_SK_SNDBUF);
	}
	bpf_sk_release(sk);
	if (!tp)
		return 0;
	redir = mesh_redir.lookup(&cookie);
	if (!redir)
		return 1;  /* R is made with B: without it nothing could be counted */
	backlog = *redir + *base;
	if ((__s64)(backlog - acked) >= (__s64)MESH_FLIGHT_MAX)
		return 1;
	/* bytes in T's psock queue, plus these, with room for skb overhead */
	need = backlog - stream + len;
	if ((__s64)need < 0)
		need = len;
	need += need / 8 + 2048;
	return wmem + (__s64)need > sndbuf;
}

/* Is the peer T itself passing, i.e. does Python hold bytes of T's own
 * stream (T's X != Y)? Then no redirect into T: what this program
 * redirects waits in T's psock list, and T's own passes queue behind it
 * there uncharged (tcp_read_skb orphaned them), so T's window stays open
 * while T's receive memory is due; charged all at once they take T past
 * its buffer, the kernel retracts T's window (NOMEM, 6.12.y+) and drops
 * what is in flight, and T's sender waits out its retransmission backoff
 * (bench/results/echo-stall.md). Holding back here lets T's list drain, so
 * T's passes are charged as they come and T's window closes in time. An
 * instant's claim on T's X (a redirect in flight on another CPU) may hold
 * one segment back for nothing: Python carries it, in order. */
static __always_inline int mesh_peer_passing(__u64 *peer)
{
	__u64 *x, *y;

	/* a T without a peer of its own (sk_msg's accepted socket, whose Y
	 * starts at what Python carried) is not redirected from: not this */
	if (!mesh_peer.lookup(peer))
		return 0;
	x = mesh_passed.lookup(peer);
	if (!x)
		return 0;
	y = mesh_sent.lookup(peer);
	return *x != (y ? *y : 0);
}

/* TCP may queue a segment that begins before rcv_nxt, when a retransmission
 * overlaps bytes already received (tcp_data_queue's partial packet);
 * tcp_recvmsg skips the old bytes, but tcp_read_skb (6.0+) hands the verdict
 * the whole skb, so they would be passed or redirected twice (seen on 6.18:
 * blocks of k MSS repeated after a hold-back under load). The skb's control
 * block still holds TCP's seq, end_seq and flags (sk_skb programs read
 * skb->cb from its start, struct sk_skb_cb.data, since 5.16; checked per
 * segment: end_seq - seq must be len, plus 1 with a FIN). N (mesh_seq) is
 * where the socket's next new byte starts. MESH_SEQ_CHECK (the agent sets
 * it from the kernel release, meshagent.bpf.features.seq_check): 0 no
 * check; 1 a segment with old bytes is dropped and the socket marked, and
 * the forwarder resets its connection (kernels where changing the skb's
 * head could panic); 2 the old bytes are cut off the front. Returns 0: go
 * on with *len bytes; 1: nothing new, drop it; -1: dropped, the stream is
 * cut here (the forwarder resets the connection: never a hole). */
#ifndef MESH_SEQ_CHECK
#define MESH_SEQ_CHECK 0
#endif
#define MESH_TRIM_STEP 4095   /* bpf_skb_adjust_room's limit per call */
#define MESH_TRIM_STEPS 64    /* 255 KiB; past it (BIG TCP), a reset */

/* N for a socket's first segment. Python made the entry MESH_SEQ_COPIED
 * when it put the socket into the sockhash after reading it only with
 * recv() (which counts exactly): then the socket's copied_seq, as the first
 * segment may overlap too. Otherwise (a socket an earlier agent spliced)
 * the segment's own seq: unchecked, it starts the count. */
static __always_inline __u64 mesh_first_seq(__u64 cookie, __u64 *next, __u32 seq)
{
	struct bpf_sock *sk;
	__u64 at = seq;
	void *tp;

	if (!next || !(*next & MESH_SEQ_COPIED) || MESH_TCP_COPIED_SEQ == 0)
		return at;
	sk = (struct bpf_sock *)mesh_sockhash.lookup(&cookie);
	if (!sk)
		return at;
	tp = bpf_skc_to_tcp_sock(sk);
	if (tp)
		at = *(__u32 *)(tp + MESH_TCP_COPIED_SEQ);
	bpf_sk_release(sk);
	return at;
}

static __always_inline int mesh_fresh(struct __sk_buff *skb, __u64 cookie, __u64 *len)
{
	__u32 seq = skb->cb[0], end = skb->cb[1];
	__u32 fin = skb->cb[3] & 1;  /* TCP_SKB_CB(skb)->tcp_flags & TCPHDR_FIN */
	__u32 old, step;
	__u64 *next, at;
	int i;

	if (end - seq != (__u32)*len + fin) {
		mesh_count(MESH_REASON_SEQ_UNKNOWN);
		return 0;
	}
	next = mesh_seq.lookup(&cookie);
	if (!next || (*next & MESH_SEQ_COPIED)) {
		at = mesh_first_seq(cookie, next, seq);
		mesh_seq.update(&cookie, &at);
		next = mesh_seq.lookup(&cookie);
		if (!next)
			return 0;  /* map full: unchecked */
	}
	if (*next & MESH_SEQ_LOST)
		return 1;
	old = (__u32)*next - seq;
	if ((__s32)old > 0) {
		if (old >= *len) {
			mesh_count(MESH_REASON_OVERLAP);
			return 1;
		}
#if MESH_SEQ_CHECK >= 2
		/* one allocation for all the old bytes: each step then only pulls */
		bpf_skb_pull_data(skb, old);
		for (i = 0; i < MESH_TRIM_STEPS && old > 0; i++) {
			step = old > MESH_TRIM_STEP ? MESH_TRIM_STEP : old;
			if (bpf_skb_adjust_room(skb, -(__s32)step, 0, 0) != 0)
				break;
			old -= step;
		}
#endif
		if (old > 0) {
			*next |= MESH_SEQ_LOST;
			mesh_count(MESH_REASON_OVERLAP_LOST);
			return -1;
		}
		*len = skb->len;
		mesh_count(MESH_REASON_OVERLAP);
	}
	*next = end - fin;
	return 0;
}

/* The first segment held back since Python last caught up: tell the
 * forwarder which socket to read (it does not watch spliced sockets for
 * EPOLLIN). Lost (ring full): counted, the forwarder's sweep finds it. */
static __always_inline void mesh_wake_up(__u64 cookie)
{
	if (mesh_wake.ringbuf_output(&cookie, sizeof(cookie), 0) != 0)
		mesh_count(MESH_REASON_WAKE_LOST);
}

int mesh_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	__u64 len = skb->len;
	__u64 *passed, *sent, *peer, *redir;
	__u64 before, zero = 0, y;

	if (len == 0) {
		mesh_count(MESH_REASON_EOF_DROP);
		return SK_DROP;
	}
#if MESH_SEQ_CHECK
	if (mesh_fresh(skb, cookie, &len) != 0)
		return SK_DROP;  /* nothing new, or a stream the forwarder resets */
#endif
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
	if (mesh_peer_passing(peer) || mesh_over_budget(cookie, peer, len)) {
		mesh_count(MESH_REASON_THROTTLED);
		mesh_wake_up(cookie);
		return SK_PASS;  /* keeps the claim: Python carries it, in order */
	}
	if (mesh_sockhash.sk_redirect_hash(skb, peer, 0) != SK_PASS) {
		mesh_count(MESH_REASON_REDIR_FAIL);
		return SK_PASS;
	}
	__sync_fetch_and_add(passed, -len);
	redir = mesh_redir.lookup(&cookie);  /* made by Python with B (or no budget) */
	if (redir)
		__sync_fetch_and_add(redir, len);
	mesh_count(MESH_REASON_SPLICED);
	return SK_PASS;
}
