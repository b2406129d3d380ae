"""The steer tools: training, interpretation (keywords, explain), transfer, composition, reference
import, Hugging Face model loading, the embedded default model and random steers. No vLLM."""
