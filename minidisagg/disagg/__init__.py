"""Disaggregated serving: prefill workers, decode workers, the router between them, and launchers."""
