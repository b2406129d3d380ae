"""`python -m vllm_steer.cli`: the same command line as the `vllm-steer` script."""

from . import main

if __name__ == "__main__":  # vLLM's launcher spawns processes that re-import the main module
    main()
