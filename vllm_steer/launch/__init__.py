"""Starting vLLM for `vllm-steer serve`, in the CLI's process before any vLLM process exists: the plan (vLLM's
arguments parsed once, the launcher, the runtime-updates policy) and the KV cache on vLLM's CPU build."""
