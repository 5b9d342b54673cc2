"""vLLM KV connector: ``kv_connector_module_path = "splitzip_vllm.connector"``, class ``SplitZipConnector``."""
from .connector import SplitZipConnector

__all__ = ["SplitZipConnector"]
