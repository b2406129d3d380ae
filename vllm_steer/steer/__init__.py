"""The steer itself, with no vLLM: its file format (`file`, `fingerprint`), its math (`formula`) and
the request values that drive it (`values`)."""
