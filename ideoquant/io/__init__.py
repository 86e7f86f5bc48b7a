"""Files: the one safetensors source reader, streaming GGUF and safetensors writers, staged atomic outputs."""
