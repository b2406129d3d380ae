"""`python -m vllm_steer.cli`: the same command line as the `vllm-steer` script."""

from . import main

main()
