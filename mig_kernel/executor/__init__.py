"""The remoting server: one process per slice, started and recycled by the broker."""
