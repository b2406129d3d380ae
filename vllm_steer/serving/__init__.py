"""Everything that runs inside vLLM's processes: the vLLM versions and internals relied on (`vllm_internals`)
and the patches of them (`vllm_patches`); in the API front end, the admitted steers (`front_end`), the state
processor's request checks (`processor`), the runtime registry's routes (`registry`) and metrics; in each
worker, its steering (`worker`: the table of `table`, the model it is attached to), the steered logits layer
(`layer`) and the state processor's bookkeeping; the configuration that travels to every process
(`config`, no vLLM import) and the offline `LLM` helper (`offline`)."""
