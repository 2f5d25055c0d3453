"""L4 authorization by address, port and workload identity (issue [H])."""
