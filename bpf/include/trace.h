/* SPDX-License-Identifier: GPL-2.0 */
/* Events for `meshagent trace`: the decision of every connect, and the
 * life of every steered connection, into the mesh_events ring buffer.
 * When nobody traces, an event costs one array lookup (mesh_trace[0].on)
 * and nothing else; the agent clears the flag when the tracer goes away. */
#ifndef MESH_TRACE_H
#define MESH_TRACE_H

#include "maps.h"
#include "metrics.h"

#define MESH_EV_CONNECT 1      /* a connect() decided: steered or passed (reason) */
#define MESH_EV_ESTABLISHED 2  /* a steered connection is up and re-keyed */
#define MESH_EV_CLOSED 3       /* a steered connection's client socket closed */

/* Does a tracer want events of this pod and port? One lookup when not. */
static __always_inline int mesh_tracing(__u64 netns, __u16 port)
{
	__u32 zero = 0;
	struct mesh_trace_cfg *cfg = mesh_trace.lookup(&zero);

	if (!cfg || !cfg->on)
		return 0;
	if (cfg->netns && cfg->netns != netns)
		return 0;
	return !cfg->port || cfg->port == port;
}

static __always_inline void mesh_event_fill(struct mesh_event *ev, __u8 kind, __u8 reason,
					    __u64 netns, __u64 cookie,
					    const struct mesh_addr *addr, __u16 port)
{
	ev->kind = kind;
	ev->reason = reason;
	ev->netns = netns;
	ev->cookie = cookie;
	ev->addr = *addr;
	ev->port = port;
}

/* An event of a socket's life (no process context: sock_ops). */
static __always_inline void mesh_event(__u8 kind, __u8 reason, __u64 netns, __u64 cookie,
				       const struct mesh_addr *addr, __u16 port)
{
	struct mesh_event ev = {};

	if (!mesh_tracing(netns, port))
		return;
	mesh_event_fill(&ev, kind, reason, netns, cookie, addr, port);
	mesh_events.ringbuf_output(&ev, sizeof(ev), 0);
}

#endif /* MESH_TRACE_H */
