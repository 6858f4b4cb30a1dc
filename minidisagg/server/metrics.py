"""The server's Prometheus collectors, in a registry of their own (no process-wide state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Bucket edges in seconds: from a fast GPU step (a few ms) to a long CPU prefill under load (a minute).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                     30.0, 60.0)
PREFIX = "minidisagg"


class ServerMetrics:
    """Request counts, token counts, TTFT / ITL / E2E histograms and the engine's queue and KV gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered, by route and status code",
                                     ["route", "status"], registry=r)
        self.requests_finished = Counter(f"{PREFIX}_requests_finished",
                                         "generation requests that ended, by how (stop, length, abort, error, timeout)",
                                         ["finish_reason"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "tokens generated and delivered",
                                         registry=r)
        self.ttft_s = Histogram(f"{PREFIX}_time_to_first_token_seconds", "request received -> first token ready",
                                buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl_s = Histogram(f"{PREFIX}_inter_token_latency_seconds", "time between a request's successive tokens",
                               buckets=LATENCY_BUCKETS_S, registry=r)
        self.e2e_s = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "request received -> last token ready",
                               buckets=LATENCY_BUCKETS_S, registry=r)
        self.running = Gauge(f"{PREFIX}_num_requests_running", "requests being prefilled or decoded", registry=r)
        self.waiting = Gauge(f"{PREFIX}_num_requests_waiting", "requests queued before their prefill", registry=r)
        self.kv_free_blocks = Gauge(f"{PREFIX}_kv_free_blocks", "free KV cache blocks, per worker", ["worker"],
                                    registry=r)
        self.kv_total_blocks = Gauge(f"{PREFIX}_kv_total_blocks", "KV cache blocks in the pool, per worker",
                                     ["worker"], registry=r)
        self.prefix_cache_hit_tokens = Counter(
            f"{PREFIX}_prefix_cache_hit_tokens", "prompt tokens of finished requests taken from a prefix cache, not "
            f"computed (over {PREFIX}_prompt_tokens: the realised hit rate)", registry=r)
        self.router_predicted_hit_rate = Gauge(
            f"{PREFIX}_router_predicted_prefix_hit_rate", "cache_aware routing: prompt tokens the router expected "
            "to be cached where it sent them, over all it routed", registry=r)
        self.decode_kv_reused_tokens = Counter(
            f"{PREFIX}_decode_kv_reused_tokens", "prompt tokens of finished requests whose KV the decode worker's "
            f"prefix cache held, so it was not sent (over {PREFIX}_prompt_tokens: the realised decode reuse rate)",
            registry=r)
        self.router_predicted_decode_reuse_rate = Gauge(
            f"{PREFIX}_router_predicted_decode_reuse_rate", "cache_aware routing: prompt tokens the router expected "
            "the chosen decode worker to hold already, over all it routed", registry=r)
        self.kv_transfer_bytes = Counter(f"{PREFIX}_kv_transfer_bytes", "KV cache bytes moved between workers",
                                         registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every collector."""
        return generate_latest(self.registry)
