"""The steer tools: training, interpretation (keywords, explain), transfer, composition, reference import,
Hugging Face model loading and the embedded default model. No vLLM."""
