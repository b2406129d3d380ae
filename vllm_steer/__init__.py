"""vllm-steer: LM-Steer (Han et al., ACL 2024) served by vLLM, each request with its own steer.

The public API is small: `SteerFile` (the file format), `steer_args` (a request's
per-request values), `SteerConfig` (which steers a server loads). The vLLM integration lives
in `vllm_steer.vllm_integration` and is imported only inside vLLM's processes.
"""

from .steer_config import SteerConfig
from .steer_file import SteerFile, SteerFileError, SteerHeader, embedding_fingerprint
from .steer_request import SteerRequestError, parse_steer_args, steer_args

__all__ = [
    "SteerConfig",
    "SteerFile",
    "SteerFileError",
    "SteerHeader",
    "SteerRequestError",
    "embedding_fingerprint",
    "parse_steer_args",
    "steer_args",
]
