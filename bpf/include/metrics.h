/* SPDX-License-Identifier: GPL-2.0 */
#ifndef MESH_METRICS_H
#define MESH_METRICS_H

#include "maps.h"

static __always_inline void mesh_count(__u32 reason, __u32 dir)
{
	__u32 idx = reason * MESH_DIR_MAX + dir;
	__u64 *val = mesh_metrics.lookup(&idx);

	if (val)
		*val += 1;
}

#endif /* MESH_METRICS_H */
