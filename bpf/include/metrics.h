/* SPDX-License-Identifier: GPL-2.0 */
#ifndef MESH_METRICS_H
#define MESH_METRICS_H

#include "maps.h"

/* Count a decision (every one is of an outbound connection). */
static __always_inline void mesh_count(__u32 reason)
{
	__u64 *val = mesh_metrics.lookup(&reason);

	if (val)
		*val += 1;
}

#endif /* MESH_METRICS_H */
