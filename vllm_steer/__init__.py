"""vllm-steer: LM-Steer (Han et al., ACL 2024) served by vLLM, each request with its own steer.

The public API is small: `SteerFile` (the file format), `steer_args` (a request's per-request values),
`SteerConfig` (which steers a server loads), `steered_llm` (an offline `vllm.LLM`). The rooms:
`steer/` is the steer itself (file format, math, the bank, request values; no vLLM), `serving/` what runs
inside vLLM's processes, `launch/` what `vllm-steer serve` does before vLLM starts, `tools/` the steer tools,
`cli/` the command line, `plugin` the names vLLM loads, `kernels` the per-row gather steer op (torch and
Triton) and `testing` what the tests, benchmarks and demo share. Importing this package, or running any
`vllm-steer` subcommand but `serve`, imports no vLLM.
"""

from .serving.config import SteerConfig
from .serving.offline import steered_llm
from .steer.file import SteerFile, SteerFileError, SteerHeader
from .steer.fingerprint import embedding_fingerprint
from .steer.values import SteerRequestError, parse_steer_args, steer_args

__all__ = [
    "SteerConfig",
    "SteerFile",
    "SteerFileError",
    "SteerHeader",
    "SteerRequestError",
    "embedding_fingerprint",
    "parse_steer_args",
    "steer_args",
    "steered_llm",
]
