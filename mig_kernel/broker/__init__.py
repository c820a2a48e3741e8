"""The node broker (control plane): slices, leases, queue, warm executors, state."""
