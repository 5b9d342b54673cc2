"""Helpers to run real vLLM prefill/decode servers and the proxy on one machine (tests, demo, benchmarks)."""
