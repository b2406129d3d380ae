"""The KV cache `vllm-steer serve` gives vLLM's CPU worker: sized to the model, --max-model-len and
--max-num-seqs, where vLLM alone would take a fraction of the whole machine's memory.

vLLM's CPU worker, unless told a size (`VLLM_CPU_KVCACHE_SPACE` in whole GiB, or
`--kv-cache-memory-bytes`), fills `gpu_memory_utilization` x the memory node's total with KV cache
(12 GB resident for the 135M default model on a 24 GB machine). Here the size is one that serves
`max_num_seqs` requests of `max_model_len` tokens at once, never below one full-length request
(vLLM refuses to start below that) and capped at 2 GiB or a quarter of the available memory; the
operator's own choice always wins. `size_kv_cache` is the arithmetic; `choose_cpu_kv_cache` reads
the operator's arguments with vLLM's own parser and the model's config."""

from __future__ import annotations

import math
import os
from argparse import Namespace
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata

GIB = 1 << 30
DEFAULT_CAP_BYTES = 2 * GIB
AVAILABLE_FRACTION = 0.25
KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"
HOW_TO_CHOOSE = f"set {KV_SPACE_ENV}=GIB or --kv-cache-memory-bytes to choose"


class KVCacheDoesNotFit(ValueError):
    """Even one request of --max-model-len tokens does not fit in the memory available."""


@dataclass(frozen=True)
class KVCacheSize:
    """A KV cache size per worker, in whole blocks, and why it is that size."""

    bytes: int
    blocks: int
    block_size: int
    bytes_per_token: int
    max_model_len: int
    max_num_seqs: int
    limited_by: str

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    @property
    def full_length_requests(self) -> float:
        """How many requests of max_model_len tokens fit at once."""
        return self.blocks / math.ceil(self.max_model_len / self.block_size)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_size: int, dtype_bytes: int) -> int:
    """Bytes of K and V one token takes in every layer (per tensor-parallel rank: its own kv heads)."""
    return 2 * num_layers * num_kv_heads * head_size * dtype_bytes


def size_kv_cache(bytes_per_token: int, block_size: int, max_model_len: int, max_num_seqs: int,
                  available_bytes: int | None = None, workers: int = 1, cap_bytes: int = DEFAULT_CAP_BYTES,
                  available_fraction: float = AVAILABLE_FRACTION) -> KVCacheSize:
    """The KV cache per worker: enough blocks for `max_num_seqs` requests of `max_model_len` tokens,
    at least one full-length request plus a block, at most `cap_bytes` or `available_fraction` of
    `available_bytes` (shared by `workers`), whichever is smaller. KVCacheDoesNotFit, naming the
    --max-model-len that would fit, when even one full-length request does not fit in memory."""
    if min(bytes_per_token, block_size, max_model_len, max_num_seqs, workers) <= 0:
        raise ValueError("bytes_per_token, block_size, max_model_len, max_num_seqs and workers must be positive")
    block = block_size * bytes_per_token
    per_request = math.ceil(max_model_len / block_size)
    floor = per_request + 1
    wanted = max_num_seqs * per_request
    budget = cap_bytes if available_bytes is None else min(cap_bytes, int(available_fraction * available_bytes))
    ceiling = max(floor, budget // workers // block)
    if available_bytes is not None and floor * block * workers > available_bytes:
        fits = max(0, (available_bytes // workers // block - 1) * block_size)
        raise KVCacheDoesNotFit(
            f"one request of --max-model-len {max_model_len} needs a KV cache of {floor * block / GIB:.2f} GiB "
            f"per worker ({bytes_per_token:,} bytes per token, {workers} worker(s)), more than the "
            f"{available_bytes / GIB:.2f} GiB of memory available: pass --max-model-len {fits} or less"
            + (", or free memory" if fits else "; free memory or use a smaller model or --kv-cache-dtype"))
    if wanted <= floor:
        blocks, limited_by = floor, "the minimum: one full-length request (vLLM refuses less) plus a block"
    elif wanted <= ceiling:
        blocks, limited_by = wanted, "room for every one of --max-num-seqs at full length"
    else:
        cap = f"{cap_bytes / GIB:g} GiB" if budget == cap_bytes else f"{available_fraction:.0%} of available memory"
        blocks, limited_by = ceiling, f"capped at {cap}" + (f" over {workers} workers" if workers > 1 else "")
    return KVCacheSize(blocks * block, blocks, block_size, bytes_per_token, max_model_len, max_num_seqs, limited_by)


def is_cpu_build() -> bool:
    """vLLM's CPU build is installed (the `vllm-cpu` distribution), or the target device says CPU;
    the way vLLM itself decides, without importing it."""
    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu":
        return True
    try:
        metadata.version("vllm")
        return False
    except metadata.PackageNotFoundError:
        pass
    try:
        metadata.version("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        return False


@dataclass(frozen=True)
class KVCacheChoice:
    """What `vllm-steer serve` adds to vLLM's arguments, and the line it logs."""

    args: list[str]
    message: str
    size: KVCacheSize | None = None


def choose_cpu_kv_cache(namespace: Namespace, environ: Mapping[str, str] | None = None) -> KVCacheChoice:
    """The KV cache for a CPU server started with vLLM's arguments `namespace` (their parse by vLLM's own
    parser): nothing added when the operator chose (VLLM_CPU_KVCACHE_SPACE, --kv-cache-memory-bytes in any
    spelling vLLM accepts, --num-gpu-blocks-override), else `--kv-cache-memory-bytes` sized by
    `size_kv_cache`. If vLLM's config cannot be read, nothing is added and the message says so."""
    environ = os.environ if environ is None else environ
    if environ.get(KV_SPACE_ENV, "") != "":
        return KVCacheChoice([], f"vllm-steer: CPU build: KV cache {environ[KV_SPACE_ENV]} GiB, the operator's "
                                 f"{KV_SPACE_ENV}")
    if namespace.kv_cache_memory_bytes is not None:
        return KVCacheChoice([], f"vllm-steer: CPU build: KV cache {namespace.kv_cache_memory_bytes / GIB:.2f} GiB, "
                                 "the operator's --kv-cache-memory-bytes")
    if namespace.num_gpu_blocks_override is not None:
        return KVCacheChoice([], f"vllm-steer: CPU build: KV cache of {namespace.num_gpu_blocks_override} blocks, "
                                 "the operator's --num-gpu-blocks-override")
    try:
        size, dtype = _size_from_vllm_config(namespace)
    except KVCacheDoesNotFit:
        raise
    except Exception as e:  # an unusual model vLLM's config objects cannot describe here: leave it to vLLM
        return KVCacheChoice([], f"vllm-steer: CPU build: could not size the KV cache ({type(e).__name__}: {e}); "
                                 f"vLLM will use gpu_memory_utilization x the machine's memory: {HOW_TO_CHOOSE}")
    message = (
        f"vllm-steer: CPU build: KV cache {size.bytes / GIB:.2f} GiB = {size.tokens:,} tokens "
        f"({size.bytes_per_token:,} B/token, {dtype}; max-model-len {size.max_model_len:,}, max-num-seqs "
        f"{size.max_num_seqs}: {size.full_length_requests:.1f} full-length requests at once; {size.limited_by}); "
        f"{HOW_TO_CHOOSE}"
    )
    return KVCacheChoice(["--kv-cache-memory-bytes", str(size.bytes)], message, size)


def _size_from_vllm_config(namespace) -> tuple[KVCacheSize, str]:
    """The size from vLLM's engine config (reads the model's config.json, starts nothing)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    from vllm_steer.serving.vllm_internals import check_internals

    check_internals("kv_cache_sizing")
    config = EngineArgs.from_cli_args(namespace).create_engine_config(UsageContext.OPENAI_API_SERVER)
    model, parallel, cache = config.model_config, config.parallel_config, config.cache_config
    dtype = kv_cache_dtype_str_to_dtype(cache.cache_dtype, model)
    per_token = kv_bytes_per_token(model.get_num_layers(parallel), model.get_num_kv_heads(parallel),
                                   model.get_head_size(), dtype.itemsize)
    size = size_kv_cache(per_token, cache.block_size or 128, model.max_model_len,
                         config.scheduler_config.max_num_seqs, available_bytes=_available_memory(),
                         workers=parallel.world_size * (parallel.data_parallel_size_local or 1))
    uniform = not (model.use_mla or model.is_hybrid or model.get_sliding_window() is not None)
    return size, str(dtype).removeprefix("torch.") + ("" if uniform else ", an estimate for this attention layout")


def _available_memory() -> int | None:
    """The memory vLLM's CPU worker will see as available on its node (the cgroup limit included)."""
    try:
        from vllm.utils.cpu_resource_utils import get_memory_node_info

        return int(get_memory_node_info(0).available_memory)
    except Exception:
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except Exception:
            return None
