"""splitzip-vllm: lossless SplitZip KV-cache compression for vLLM prefill/decode disaggregation."""
__version__ = "0.1.0"
