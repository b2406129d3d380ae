"""The steer itself, with no vLLM: its file format (`file`, `fingerprint`), its math (`formula`), the bank that
packs many steers for per-row gathering (`bank`) and the request values that drive it (`values`)."""
