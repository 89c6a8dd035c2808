"""Eviction policies (importance methods, KVCrush, the upstream-compatible algorithm) and the
planner that turns a policy's choice into kept rows per (layer, KV head)."""
