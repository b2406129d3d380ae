"""The package's logger, under vLLM's "vllm" logger (its handler, level and format once vLLM has set up
logging), importable without importing vLLM."""

import logging

logger = logging.getLogger("vllm.vllm_steer")
