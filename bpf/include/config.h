/* SPDX-License-Identifier: GPL-2.0 */
/* Configuration: every knob enters as a -DMESH_* cflag built by
 * meshagent.config.bpf_cflags(); each has a default here. */
#ifndef MESH_CONFIG_H
#define MESH_CONFIG_H

/* Capacity of the attached-pod map. */
#ifndef MESH_PODS_MAX
#define MESH_PODS_MAX 1024
#endif

/* Capacity of the original-destination maps (connections in flight). */
#ifndef MESH_CONNS_MAX
#define MESH_CONNS_MAX 65536
#endif

/* Capacity of mesh_own: the forwarder's upstream connects in flight. */
#ifndef MESH_OWN_MAX
#define MESH_OWN_MAX 1024
#endif

/* Size of the trace ring buffer, in pages. */
#ifndef MESH_EVENTS_PAGES
#define MESH_EVENTS_PAGES 64
#endif

/* Back-pressure through the sockmap: bytes a spliced socket may have on
 * their way to its peer's other end, not yet acked, before the verdict holds
 * the rest back (bpf/skb_verdict.c). */
#ifndef MESH_FLIGHT_MAX
#define MESH_FLIGHT_MAX (4 << 20)
#endif

/* Byte offsets in struct tcp_sock (struct sock's fields included: it is
 * embedded first), read from the running kernel's BTF by the agent
 * (meshagent.bpf.btf): the installed headers may be another kernel's.
 * 0: unknown: the verdict never holds back, and sk_msg.c counts P itself. */
#ifndef MESH_TCP_BYTES_ACKED
#define MESH_TCP_BYTES_ACKED 0
#endif
#ifndef MESH_TCP_WRITE_SEQ
#define MESH_TCP_WRITE_SEQ 0
#endif
#ifndef MESH_TCP_SND_UNA
#define MESH_TCP_SND_UNA 0
#endif
#ifndef MESH_TCP_COPIED_SEQ
#define MESH_TCP_COPIED_SEQ 0
#endif
#ifndef MESH_TCP_RCV_NXT
#define MESH_TCP_RCV_NXT 0
#endif
#ifndef MESH_TCP_BYTES_RECEIVED
#define MESH_TCP_BYTES_RECEIVED 0
#endif
#ifndef MESH_SK_RMEM_ALLOC
#define MESH_SK_RMEM_ALLOC 0
#endif
#ifndef MESH_SK_RCVBUF
#define MESH_SK_RCVBUF 0
#endif
#ifndef MESH_SK_WMEM_QUEUED
#define MESH_SK_WMEM_QUEUED 0
#endif
#ifndef MESH_SK_SNDBUF
#define MESH_SK_SNDBUF 0
#endif
#ifndef MESH_SK_FLAGS
#define MESH_SK_FLAGS 0
#endif
#ifndef MESH_SK_ERR
#define MESH_SK_ERR 0
#endif

/* Size of mesh_kdone (kernel-mode connections' records), in pages. */
#ifndef MESH_KDONE_PAGES
#define MESH_KDONE_PAGES 256
#endif

/* mesh_kdone wakes the agent once this many records wait (else the agent
 * reads it on its own, a few times a second): one wake-up per batch, not
 * per connection. */
#ifndef MESH_KDONE_WAKE
#define MESH_KDONE_WAKE 1024
#endif

/* Capacity of mesh_kfwd: destinations a kernel-mode pod still sends
 * through the forwarder (other nodes' pods, pods with ingress rules). */
#ifndef MESH_KFWD_MAX
#define MESH_KFWD_MAX 16384
#endif

/* Size of mesh_wake (throttled sockets for the forwarder), in pages. */
#ifndef MESH_WAKE_PAGES
#define MESH_WAKE_PAGES 16
#endif

/* Kernel capability (set by the plan from the probe): the connect hooks
 * may call bpf_get_current_pid_tgid and bpf_get_current_comm. */
#ifndef MESH_HAVE_CURRENT_TASK_SOCK_ADDR
#define MESH_HAVE_CURRENT_TASK_SOCK_ADDR 0
#endif

/* Kernel capability: sock_ops may call bpf_sock_hash_update (the sk_msg path). */
#ifndef MESH_HAVE_SOCK_HASH_UPDATE_SOCK_OPS
#define MESH_HAVE_SOCK_HASH_UPDATE_SOCK_OPS 0
#endif

/* Capacity of the excluded port and CIDR maps. */
/* Policy entries (pods x destination prefixes), allocated as used. */
#ifndef MESH_POL_MAX
#define MESH_POL_MAX 65536
#endif

#ifndef MESH_EXCL_MAX
#define MESH_EXCL_MAX 256
#endif

/* Kernel-side fail-open: look for the pod's listener before rewriting. */
#ifndef MESH_CHECK_LISTENER
#define MESH_CHECK_LISTENER 1
#endif

/* Tests only: make the kernel refuse mesh_sockops at load (a helper sock_ops
 * programs may not call), so the agent's fallback is proven against a real
 * verifier refusal. Never set in production. */
#ifndef MESH_TEST_REFUSE
#define MESH_TEST_REFUSE 0
#endif

/* Debug printing compiles out unless asked for. */
#ifndef MESH_DEBUG
#define MESH_DEBUG 0
#endif

/* Kernel ABI constants (from linux/socket.h, linux/in.h, linux/net.h),
 * spelled out so the programs need no more headers than BCC's. */
#define MESH_AF_INET 2
#define MESH_AF_INET6 10
#define MESH_SOCK_STREAM 1
#define MESH_IPPROTO_TCP 6

#if MESH_CONNS_MAX < 16
#error "MESH_CONNS_MAX must be at least 16"
#endif

#ifndef barrier_var
#define barrier_var(var) asm volatile("" : "+r"(var))
#endif

#if MESH_DEBUG
#define mesh_dbg(fmt, ...) bpf_trace_printk(fmt, ##__VA_ARGS__)
#else
#define mesh_dbg(fmt, ...) do { } while (0)
#endif

#endif /* MESH_CONFIG_H */
