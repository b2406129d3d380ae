"""The KV cache `vllm-steer serve` chooses on the CPU build: the arithmetic (config numbers in,
bytes out) and, through vLLM's real argument parser and the default model's config, which operator
arguments it leaves alone. The served check (vLLM allocates what was chosen) is in
test_reference_serving.py."""

from __future__ import annotations

from argparse import Namespace

import pytest

from vllm_steer.launch.cpu_kv_cache import (
    GIB,
    KV_SPACE_ENV,
    KVCacheDoesNotFit,
    choose_cpu_kv_cache,
    is_cpu_build,
    kv_bytes_per_token,
    size_kv_cache,
)
from vllm_steer.launch.plan import parse_vllm_args

# The default model (SmolLM2-135M): 30 layers, 3 kv heads of 64, float32.
DEFAULT_MODEL_BPT = 46_080
BLOCK = 128 * DEFAULT_MODEL_BPT  # 5,898,240 bytes


def test_bytes_per_token():
    assert kv_bytes_per_token(30, 3, 64, 4) == DEFAULT_MODEL_BPT
    assert kv_bytes_per_token(30, 3, 64, 2) == DEFAULT_MODEL_BPT // 2  # bf16 halves it
    assert kv_bytes_per_token(30, 1, 64, 4) == DEFAULT_MODEL_BPT // 3  # TP=3: one kv head per rank


def test_serve_defaults_are_capped_at_2_gib():
    """The README's example: max-model-len 8192 (the model's), max-num-seqs 128 (vLLM's CPU server
    default) would want 45 GiB; capped at 2 GiB, which vLLM turns into 364 blocks = 46,592 tokens."""
    size = size_kv_cache(DEFAULT_MODEL_BPT, 128, 8192, 128)
    assert size.blocks == 2 * GIB // BLOCK == 364 and size.bytes == 364 * BLOCK and size.tokens == 46_592
    assert size.limited_by == "capped at 2 GiB" and round(size.full_length_requests, 2) == 5.69
    # Plenty of memory does not lift the cap; little memory lowers it to a quarter of what is available.
    assert size_kv_cache(DEFAULT_MODEL_BPT, 128, 8192, 128, available_bytes=64 * GIB).blocks == 364
    quarter = size_kv_cache(DEFAULT_MODEL_BPT, 128, 8192, 128, available_bytes=4 * GIB)
    assert quarter.blocks == GIB // BLOCK == 182 and "25% of available memory" in quarter.limited_by


def test_size_follows_max_num_seqs_and_max_model_len():
    tests = size_kv_cache(DEFAULT_MODEL_BPT, 128, 1024, 32)
    assert tests.blocks == 32 * 8 and tests.limited_by == "room for every one of --max-num-seqs at full length"
    assert size_kv_cache(DEFAULT_MODEL_BPT, 128, 1000, 4).blocks == 4 * 8  # partial blocks round up
    assert size_kv_cache(DEFAULT_MODEL_BPT, 32, 1024, 4).blocks == 4 * 32  # block size 32
    floor = size_kv_cache(DEFAULT_MODEL_BPT, 128, 1024, 1)
    assert floor.blocks == 8 + 1 and "the minimum: one full-length request" in floor.limited_by
    # The floor beats the cap: one 131,072-token request needs 1,025 blocks (5.6 GiB).
    long = size_kv_cache(DEFAULT_MODEL_BPT, 128, 131_072, 128, available_bytes=64 * GIB)
    assert long.blocks == 1025


def test_tensor_parallel_workers_share_the_cap():
    per_rank_bpt = kv_bytes_per_token(30, 1, 64, 4)
    size = size_kv_cache(per_rank_bpt, 128, 8192, 128, workers=3)
    assert size.bytes <= 2 * GIB // 3 and size.blocks == 2 * GIB // 3 // (128 * per_rank_bpt)
    assert "over 3 workers" in size.limited_by


def test_refuses_when_one_request_does_not_fit():
    with pytest.raises(KVCacheDoesNotFit, match=r"--max-model-len 8192 needs .*pass --max-model-len 1280 or less"):
        size_kv_cache(DEFAULT_MODEL_BPT, 128, 8192, 1, available_bytes=11 * BLOCK)
    with pytest.raises(ValueError, match="must be positive"):
        size_kv_cache(DEFAULT_MODEL_BPT, 128, 0, 1)


def test_this_venv_is_the_cpu_build():
    assert is_cpu_build()


def test_operator_env_var_wins_without_reading_anything():
    choice = choose_cpu_kv_cache(Namespace(), {KV_SPACE_ENV: "3"})  # a namespace with nothing in it: not read
    assert choice.args == [] and f"3 GiB, the operator's {KV_SPACE_ENV}" in choice.message


@pytest.mark.parametrize("operator_args, says", [
    (["--kv-cache-memory-bytes", "1536M"], "1.50 GiB, the operator's --kv-cache-memory-bytes"),
    (["--kv-cache-memory", "2G"], "2.00 GiB, the operator's"),  # an abbreviation vLLM's parser accepts
    (["--kv_cache_memory_bytes=3G"], "3.00 GiB, the operator's"),  # underscores, too
    (["--num-gpu-blocks-override", "20"], "20 blocks, the operator's --num-gpu-blocks-override"),
])
def test_operator_arguments_win(model_dir, operator_args, says):
    choice = choose(model_dir, ["--dtype", "float32", *operator_args], {})
    assert choice.args == [] and says in choice.message


def test_operator_config_file_wins(model_dir, tmp_path):
    (tmp_path / "serve.yaml").write_text("kv-cache-memory-bytes: 1G\nmax-num-seqs: 8\n")
    choice = choose(model_dir, ["--config", str(tmp_path / "serve.yaml")], {})
    assert choice.args == [] and "1.00 GiB, the operator's" in choice.message


def test_chosen_from_the_models_config(model_dir):
    choice = choose(model_dir, ["--dtype", "float32", "--max-model-len", "1024",
                                    "--max-num-seqs", "4"], {})
    assert choice.args == ["--kv-cache-memory-bytes", str(4 * 8 * BLOCK)]
    assert choice.size.bytes_per_token == DEFAULT_MODEL_BPT and choice.size.tokens == 4096
    assert "= 4,096 tokens (46,080 B/token, float32; max-model-len 1,024, max-num-seqs 4" in choice.message
    # Defaults from vLLM: the model's max length (8192) and the CPU server's 128 sequences; bf16 halves the bytes.
    readme = choose(model_dir, ["--dtype", "bfloat16"], {})
    assert readme.size.max_model_len == 8192 and readme.size.max_num_seqs == 128
    assert readme.size.bytes_per_token == DEFAULT_MODEL_BPT // 2 and readme.size.bytes <= 2 * GIB


def test_arguments_vllm_rejects_stop_before_anything_is_sized(model_dir):
    with pytest.raises(ValueError, match="vLLM's argument parser rejected the arguments"):
        parse_vllm_args(str(model_dir), ["--max-num-seqs", "many"])


def choose(model_dir, vllm_args: list[str], environ: dict[str, str]):
    """What `vllm-steer serve` does: vLLM's arguments parsed once, the KV cache chosen from the parse."""
    return choose_cpu_kv_cache(parse_vllm_args(str(model_dir), vllm_args), environ)
