/* SPDX-License-Identifier: GPL-2.0 */
/* Every map of meshagent, defined once. Names: mesh_*, at most 15 chars.
 * Python names them through meshagent.bpf.abi.MAPS (a test checks both). */
#ifndef MESH_MAPS_H
#define MESH_MAPS_H

#include "config.h"
#include "reasons.h"

/* An address in 16 bytes: IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d),
 * so one key shape serves both families. Network byte order. */
struct mesh_addr {
	__u32 a[4];
};

/* Value of mesh_pods: what an attached pod's netns gets. */
struct mesh_pod {
	__u32 pod_id;        /* the agent's id for the pod */
	__u16 port;          /* forwarder listener port, host order */
	__u16 flags;         /* MESH_POD_* */
};

/* mesh_pod.flags: kernel mode: the pod's connects go direct (no
 * forwarder) unless their destination is in mesh_kfwd; kernel.h
 * accounts for them. */
#define MESH_POD_KERNEL 1

/* An original destination, as the application asked for it. */
struct mesh_orig {
	struct mesh_addr addr;  /* destination address */
	__u16 port;             /* destination port, host order */
	__u16 flags;            /* MESH_ORIG_* (set by sock_ops) */
	__u32 pod_id;
	__u64 netns;            /* netns cookie of the pod */
	__u64 cookie;           /* the pod's socket (set by sock_ops) */
};

/* mesh_orig.flags: the pod's socket entered mesh_apphash (the sk_msg path). */
#define MESH_ORIG_APP 1

/* Key of mesh_orig_tup: the client end of a steered connection, as the
 * forwarder sees it from the accepted socket's peer. */
struct mesh_tuple {
	__u64 netns;
	struct mesh_addr addr;  /* client address */
	__u16 port;             /* client port, host order */
	__u16 pad1;
	__u32 pad2;
};

struct mesh_lpm_key {
	__u32 prefixlen;
	struct mesh_addr addr;
};

/* One event for `meshagent trace` (trace.h). */
struct mesh_event {
	__u64 netns;            /* netns cookie of the socket */
	__u64 cookie;           /* socket cookie */
	struct mesh_addr addr;  /* connect: the destination asked for; else the client */
	__u32 pid;              /* connect: the calling process (with MESH_HAVE_CURRENT_TASK_SOCK_ADDR) */
	__u16 port;             /* the port of addr, host order */
	__u8 kind;              /* MESH_EV_* */
	__u8 reason;            /* MESH_REASON_* */
	char comm[16];          /* connect: the calling process's name */
	__u32 rule;             /* denied_policy: the rule's number << 16 | its set's generation & 0xffff */
	__u32 pad;
};

/* What the tracer wants: nothing while on == 0. */
struct mesh_trace_cfg {
	__u32 on;
	__u16 port;             /* only this destination port (0: any) */
	__u16 pad;
	__u64 netns;            /* only this pod (0: any) */
};

/* netns cookie -> pod: the set of attached pods. */
BPF_HASH(mesh_pods, __u64, struct mesh_pod, MESH_PODS_MAX);
/* socket cookie -> original destination, between connect() and established. */
BPF_TABLE("lru_hash", __u64, struct mesh_orig, mesh_orig_sk, MESH_CONNS_MAX);
/* client 4-tuple half -> original destination, until the connection closes. */
BPF_HASH(mesh_orig_tup, struct mesh_tuple, struct mesh_orig, MESH_CONNS_MAX);
/* The same, for client sockets that closed: a client may connect, send and
 * close before the forwarder accepts (a fire-and-forget client); its entry
 * moves here at close so the forwarder still finds it. LRU: what nobody
 * asks for again ages out. */
BPF_TABLE("lru_hash", struct mesh_tuple, struct mesh_orig, mesh_orig_cls, MESH_CONNS_MAX);
/* excluded destination ports (host order) and CIDRs. A CIDR's value is 1,
 * or 0 for a hole: IPv4 is keyed as ::ffff:a.b.c.d, so an IPv6 network that
 * covers ::ffff:0:0/96 (::/0) gets a 0 entry there and never excludes IPv4. */
BPF_HASH(mesh_excl_port, __u16, __u8, MESH_EXCL_MAX);
BPF_LPM_TRIE(mesh_excl_cidr, struct mesh_lpm_key, __u8, MESH_EXCL_MAX);
/* socket cookie -> 1: the forwarder's own upstream sockets, written by the
 * agent before connect(), removed by the hook that sees them. Unlike a
 * socket mark, a pod cannot forge this. LRU: a connect that never reached
 * the hook leaves nothing that lasts. */
BPF_TABLE("lru_hash", __u64, __u8, mesh_own, MESH_OWN_MAX);
/* [0]: live entries of mesh_orig_tup, kept by the hooks. */
BPF_ARRAY(mesh_state, __u64, 4);
/* A pod's share of mesh_orig_tup, by its netns cookie. mesh_pod_live (the
 * hooks only) counts its entries; mesh_pod_share (Python only: a userspace
 * update replaces a whole entry) is what it is sure to get, about half the
 * map over the attached pods (redirect/ebpf.py). Past its share a pod may
 * borrow only while the map is under half full (steer.h), so no pod can
 * fill the map and send every other pod's connects direct. */
BPF_HASH(mesh_pod_live, __u64, __u64, MESH_PODS_MAX);
BPF_HASH(mesh_pod_share, __u64, __u64, MESH_PODS_MAX);
/* L4 policy (policy.h; the agent's policy/tables.py): a governed pod's
 * egress rules by destination prefix. The key holds the rule set's
 * generation (mesh_pol_gen[0]: the agent fills a new one, then flips [0]
 * and removes the old: no connect sees half a rule set) and the pod's netns
 * cookie, whose 96 bits prefixlen counts before the address's own. The
 * value: the rules that cover the prefix, DENY first, each
 *     lo | hi << 16 | action << 32 | rule << 40
 * (ports host order; action MESH_POL_ALLOW or MESH_POL_DENY). No entry: no
 * policy governs the pod's egress. */
struct mesh_pol_key {
	__u32 prefixlen;
	__u32 gen;
	__u64 netns;
	struct mesh_addr addr;
};

struct mesh_pol_val {
	__u32 n;                /* rules in r */
	__u32 pad;
	__u64 r[16];            /* MESH_POL_RULES */
};

BPF_LPM_TRIE(mesh_pol_cidr, struct mesh_pol_key, struct mesh_pol_val, MESH_POL_MAX);
BPF_ARRAY(mesh_pol_gen, __u32, 1);

/* Kernel mode (kernel.h). A kernel-mode pod's connection, by its socket
 * cookie, from its connect() until it closes (LRU: a connect that never
 * reached sock_ops leaves nothing that lasts). */
struct mesh_kconn {
	__u64 started;          /* bpf_ktime_get_ns() at connect() */
	__u64 netns;
	struct mesh_addr addr;  /* destination */
	__u32 pod_id;
	__u16 port;             /* destination port, host order */
	__u8 flags;             /* MESH_KC_* */
	__u8 closer;            /* MESH_KC_BY_*: whose FIN came first */
};

#define MESH_KC_UP 1        /* established */
#define MESH_KC_FIN_OUT 2   /* the pod's FIN is queued (FIN_WAIT1, LAST_ACK) */
#define MESH_KC_FIN_IN 4    /* the peer's FIN came (CLOSE_WAIT, CLOSING, or SOCK_DONE) */
#define MESH_KC_EXACT 8     /* in a record: FIN and error read from the socket itself */
#define MESH_KC_BY_POD 1
#define MESH_KC_BY_PEER 2

/* What the agent learns when a kernel-mode connection closes. */
struct mesh_kdone {
	__u64 netns;
	__u64 cookie;
	__u64 started;          /* ktime ns at connect() */
	__u64 ended;            /* ktime ns at close */
	__u64 sent;             /* bytes the pod sent that the peer acked */
	__u64 rcvd;             /* bytes the pod's socket took in, in order */
	struct mesh_addr addr;  /* destination */
	struct mesh_addr src;   /* the pod's end */
	__u32 pod_id;
	__s32 err;              /* sk_err at close (with MESH_KC_EXACT) */
	__u16 port;
	__u16 sport;
	__u8 flags;             /* MESH_KC_* */
	__u8 closer;            /* MESH_KC_BY_* */
	__u8 last;              /* the TCP state it closed from (BPF_TCP_*) */
	__u8 pad;
};

BPF_TABLE("lru_hash", __u64, struct mesh_kconn, mesh_kconn, MESH_CONNS_MAX);
BPF_RINGBUF_OUTPUT(mesh_kdone, MESH_KDONE_PAGES);
/* Destinations a kernel-mode pod's connects still go to the forwarder for
 * (value 1; written by the agent: other nodes' pods, for mTLS, and pods
 * whose ingress rules the forwarder checks). */
BPF_LPM_TRIE(mesh_kfwd, struct mesh_lpm_key, __u8, MESH_KFWD_MAX);
/* netns cookie -> its kernel-mode connections established now. */
BPF_HASH(mesh_klive, __u64, __s64, MESH_PODS_MAX);

/* per-CPU decision counters, index MESH_REASON_*. */
BPF_PERCPU_ARRAY(mesh_metrics, __u64, MESH_REASON_MAX);

#define MESH_STATE_TUP_LIVE 0
#define MESH_STATE_MSG_ON 1  /* != 0: sock_ops puts pods' sockets into mesh_apphash */
#define MESH_STATE_KDONE_OUT 2   /* records sock_ops put into mesh_kdone, ever */
#define MESH_STATE_KDONE_READ 3  /* ... and the agent read (written by Python alone) */

/* [0]: the tracer's wishes; the ring buffer it reads. */
BPF_ARRAY(mesh_trace, struct mesh_trace_cfg, 1);
BPF_RINGBUF_OUTPUT(mesh_events, MESH_EVENTS_PAGES);

/* The sockmap data path (skb_verdict.c). Keys are socket cookies.
 * mesh_passed (X) is written only by the verdict: bytes it passed to the
 * socket's own queue. mesh_sent (Y) is written only by Python: bytes it read
 * from that queue and fully sent on. Two maps, because a userspace update
 * replaces a whole entry and would wipe a concurrent atomic add. */
#define MESH_SOCKS_MAX (2 * MESH_CONNS_MAX)  /* two sockets per connection */
/* BPF_SOCKHASH, plus lookup: the verdict reads the peer socket's tcp_sock
 * (a lookup returns a referenced socket; bpf_sk_release it). */
struct sockhash_with_lookup {
	__u64 key;
	int leaf;
	int *(*lookup)(__u64 *);
	int (*update)(__u64 *, int *);
	int (*delete)(__u64 *);
	int (*sock_hash_update)(void *, void *, u64);
	int (*msg_redirect_hash)(void *, void *, u64);
	int (*sk_redirect_hash)(void *, void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/sockhash")))
struct sockhash_with_lookup mesh_sockhash = { .max_entries = MESH_SOCKS_MAX };
BPF_ANNOTATE_KV_PAIR(mesh_sockhash, __u64, int);
/* The forwarder's listeners, by the netns cookie of the attached pod they
 * listen in (one map per family): a connect is steered only while this
 * agent's own listener is there (steer.h). A socket leaves every sockhash
 * when it closes, so a crashed agent's pods fail open at once, and a pod's
 * own socket on the port (one it bound while no agent ran) is never taken
 * for the forwarder. */
__attribute__((section("maps/sockhash")))
struct sockhash_with_lookup mesh_lsn4 = { .max_entries = MESH_PODS_MAX };
BPF_ANNOTATE_KV_PAIR(mesh_lsn4, __u64, int);
__attribute__((section("maps/sockhash")))
struct sockhash_with_lookup mesh_lsn6 = { .max_entries = MESH_PODS_MAX };
BPF_ANNOTATE_KV_PAIR(mesh_lsn6, __u64, int);
BPF_HASH(mesh_peer, __u64, __u64, MESH_SOCKS_MAX);
BPF_HASH(mesh_passed, __u64, __u64, MESH_SOCKS_MAX);
BPF_HASH(mesh_sent, __u64, __u64, MESH_SOCKS_MAX);
/* N: the TCP sequence number of the next byte the verdict has not yet seen
 * on a socket (low 32 bits; MESH_SEQ_LOST set: bytes could not be trimmed,
 * the forwarder resets the connection). Made MESH_SEQ_COPIED by Python as
 * it puts a socket it read only with recv() into the sockhash (N is then
 * that socket's copied_seq), else on the socket's first segment; then
 * written only by the verdict; deleted by Python with the socket's X. */
BPF_HASH(mesh_seq, __u64, __u64, MESH_SOCKS_MAX);
#define MESH_SEQ_LOST (1ULL << 32)
#define MESH_SEQ_COPIED (1ULL << 33)
/* Back-pressure (skb_verdict.c): bytes on their way from a socket S to its
 * peer T's other end that it has not acked yet are
 *     R + B - T's bytes_acked     (u64 arithmetic, read as signed)
 * R (mesh_redir: made 0 by Python with B, before S has a peer; then added
 * to only by the verdict) counts the bytes redirected from S; B (mesh_flight, written only by Python) is T's stream length when
 * the pair began splicing plus what Python has sent T since (stored before
 * the Y that lets the verdict redirect again). At MESH_FLIGHT_MAX the
 * verdict passes instead of redirecting: the bytes wait in S's own receive
 * queue, charged to its buffer, so S's window closes as a direct
 * connection's would, and S's cookie goes into mesh_wake so that Python
 * carries them, within the same budget, once T's psock queue is empty
 * (R + B == T's bytes_acked + unsent). No B, no throttling. */
BPF_HASH(mesh_redir, __u64, __u64, MESH_SOCKS_MAX);
BPF_HASH(mesh_flight, __u64, __u64, MESH_SOCKS_MAX);
BPF_RINGBUF_OUTPUT(mesh_wake, MESH_WAKE_PAGES);
/* The sk_msg path (sk_msg.c). A steered connection's pod socket A enters
 * mesh_apphash at established (sock_ops, while mesh_state[MSG_ON]); its
 * sendmsg is then redirected straight to the upstream socket's egress once
 * Python has sent on every byte A passed before (P == the accepted
 * socket's Y). Keyed by A's client tuple (what an sk_msg program can
 * compute); P is made at established, and both tuple maps lose A's
 * entries when it closes. */
struct mesh_msg_pass {
	__u64 passed;           /* P: bytes A's sendmsg passed to its own TCP */
	__u64 app;              /* A's cookie: which socket this P counts */
};

struct mesh_msg_tgt {
	__u64 upstream;         /* cookie of the upstream socket (mesh_sockhash) */
	__u64 via;              /* cookie of the accepted socket: its Y in mesh_sent */
	__u64 app;              /* A's cookie, as Python read it from mesh_orig */
};

/* Replies straight into the pod's receive queue ([P] part 3, sk_msg.c):
 * the forwarder marks an upstream socket U it connects for the sk_msg path
 * (mesh_own value MESH_OWN_REPLIES); the connect hook moves the mark to
 * mesh_upsk, and at U's established sock_ops makes U's mesh_reply entry,
 * keyed as the server's end V sees the connection. When V is established
 * under the attach point (a server pod of this node), sock_ops puts V into
 * mesh_apphash. Python names the pod's socket A in the entry and makes A's
 * mesh_rarm. An sk_msg program cannot look a socket up (no bpf_sk_release
 * there), so each end reads only its own tcp_sock: A, when it sends, arms
 * (mesh_rarm) if every byte of V's TCP stream V last reported has reached A
 * and A's application has read all it received by TCP, with a budget of
 * A's free receive memory; V's send goes into A's receive queue while V's
 * TCP stream is still what A armed at and the budget lasts; otherwise it
 * takes the TCP path through U as before (and reports its stream). */
#define MESH_OWN_REPLIES 2

struct mesh_pair {
	struct mesh_addr local;   /* V's address (the server) */
	struct mesh_addr remote;  /* U's (the pod's address) */
	__u16 lport;              /* host order */
	__u16 rport;              /* host order */
	__u32 pad;
};

struct mesh_reply {
	__u64 app;      /* A's cookie in mesh_apphash (Python sets it); 0: not yet */
	__u64 ingress;  /* bytes of V's sends that went into A's receive queue */
};

/* By A's cookie: written by A's sends (armed, budget) and V's (the rest). */
struct mesh_rarm {
	__u64 armed;     /* V's TCP stream when A armed; MESH_RARM_OFF: not armed */
	__s64 budget;    /* bytes V may still put into A's receive queue */
	__u64 v_stream;  /* V's TCP stream as of its last send this program saw */
};
#define MESH_RARM_OFF (~0ULL)

BPF_TABLE("lru_hash", __u64, __u8, mesh_upsk, MESH_OWN_MAX);
BPF_TABLE("lru_hash", __u64, struct mesh_rarm, mesh_rarm, MESH_CONNS_MAX);
BPF_TABLE("lru_hash", struct mesh_pair, struct mesh_reply, mesh_reply, MESH_CONNS_MAX);

BPF_SOCKHASH(mesh_apphash, __u64, MESH_CONNS_MAX);
BPF_TABLE("lru_hash", struct mesh_tuple, struct mesh_msg_pass, mesh_msg_pass, MESH_CONNS_MAX);
BPF_TABLE("lru_hash", struct mesh_tuple, struct mesh_msg_tgt, mesh_msg_tgt, MESH_CONNS_MAX);

#endif /* MESH_MAPS_H */
