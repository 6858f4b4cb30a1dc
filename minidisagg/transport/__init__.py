"""KV transports: move KV pages from prefill workers to decode workers."""
