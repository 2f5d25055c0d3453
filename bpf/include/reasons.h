/* SPDX-License-Identifier: GPL-2.0 */
/* Why a hook did what it did. APPEND ONLY: never renumber or reuse a value,
 * Python (meshagent.bpf.abi.REASONS) and dashboards depend on them. A reason
 * no hook counts any more stays, marked "reserved" (a test checks that every
 * other one is counted somewhere, and these nowhere). */
#ifndef MESH_REASONS_H
#define MESH_REASONS_H

#define MESH_REASON_STEERED       0  /* connect rewritten to the pod's listener */
#define MESH_REASON_NOT_ATTACHED  1  /* socket's netns is not an attached pod */
#define MESH_REASON_NOT_TCP       2  /* not a TCP stream socket */
#define MESH_REASON_LOOPBACK      3  /* destination is loopback */
#define MESH_REASON_EXCL_PORT     4  /* destination port is excluded */
#define MESH_REASON_EXCL_CIDR     5  /* destination address is excluded */
#define MESH_REASON_SKIP_MARK     6  /* reserved, never counted: a pod can forge a mark (OWN_SOCKET) */
#define MESH_REASON_NO_LISTENER   7  /* fail-open: no forwarder listening in the pod */
#define MESH_REASON_MAP_FULL      8  /* fail-open: original-destination map full */
#define MESH_REASON_REKEYED       9  /* sock_ops stored the original dst by 4-tuple */
#define MESH_REASON_CLOSED       10  /* a steered connection closed, entry removed */
#define MESH_REASON_INTERNAL     11  /* reserved, never counted */
#define MESH_REASON_SPLICED      12  /* verdict: segment redirected to the peer */
#define MESH_REASON_HANDOFF      13  /* verdict: passed to Python (hand-off not done) */
#define MESH_REASON_EOF_DROP     14  /* verdict: zero-length skb (FIN) dropped */
#define MESH_REASON_REDIR_FAIL   15  /* verdict: redirect failed, passed instead */
#define MESH_REASON_UNTRACKED    16  /* verdict: socket has no counters, passed */
#define MESH_REASON_OWN_SOCKET   17  /* the forwarder's own upstream (its cookie in mesh_own) */

#define MESH_REASON_MSG_SPLICED  18  /* sk_msg: a pod's send went straight upstream */

#define MESH_REASON_THROTTLED    19  /* verdict: peer's budget full, passed (held back) */
#define MESH_REASON_WAKE_LOST    20  /* verdict: mesh_wake full, the forwarder's sweep finds it */

#define MESH_REASON_POD_QUOTA    21  /* connect refused: the pod is over its share of mesh_orig_tup */

#define MESH_REASON_MSG_DRIFT    22  /* sk_msg: P counted apart from A's stream (a send the kernel passed unseen); the stream decided */

#define MESH_REASON_OVERLAP      23  /* verdict: a segment began with bytes already delivered (a retransmission): trimmed */
#define MESH_REASON_OVERLAP_LOST 24  /* verdict: such bytes could not be trimmed: dropped, the forwarder resets the connection */
#define MESH_REASON_SEQ_UNKNOWN  25  /* verdict: the skb's control block held no TCP sequence numbers: not checked */

#define MESH_REASON_DENIED_POLICY 26 /* connect refused (EPERM): a policy rule, or its default deny */

#define MESH_REASON_KERNEL       27  /* kernel mode: the connect goes direct; sock_ops accounts it (kernel.h) */
#define MESH_REASON_ACCT_LOST    28  /* kernel mode: a connection's record found mesh_kdone full */

#define MESH_REASON_MSG_INGRESS  29  /* sk_msg: a server's reply went straight into the pod's receive queue */
#define MESH_REASON_REPLY_HELD   30  /* sk_msg: a reply took the TCP path (earlier bytes on their way, or the pod's receive buffer full) */

#define MESH_REASON_MAX          31  /* one past the last reason */

#endif /* MESH_REASONS_H */
