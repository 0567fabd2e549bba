"""Small helpers shared by several parts (atomic file writes)."""
