"""Everything that touches vLLM: the served configuration, the compatibility checks and patches, the
per-request table, the step mailbox, the steered logits layer, the state processor, the runtime
registry, metrics, the offline `LLM` helper and the server process helper. Modules here import
vLLM (except `config` and `server_process`); nothing outside this package does."""
