"""SplitZip lossless BF16 codec: wire format, calibration and backends (see docs/FORMAT.md)."""
from .api import BACKEND_NAMES, available_backends, decode, encode, get_backend
from .backends import BackendUnavailableError
from .codebook import Codebook, CodebookError, ExponentHistogram, calibrate
from .format import (DEFAULT_CHUNK_LOG2, HEADER_BYTES, VERSION, Header, PayloadError, UnsupportedDtypeError,
                     encode_capacity, parse_header)

__all__ = ["BACKEND_NAMES", "available_backends", "decode", "encode", "get_backend", "BackendUnavailableError",
           "Codebook", "CodebookError", "ExponentHistogram", "calibrate", "DEFAULT_CHUNK_LOG2", "HEADER_BYTES",
           "VERSION", "Header", "PayloadError", "UnsupportedDtypeError", "encode_capacity", "parse_header"]
