"""Every byte of file and Hub I/O: model resolution, safetensors, GGUF, strict loading."""
