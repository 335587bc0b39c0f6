"""File formats: GGUF metadata (gguf.py, no torch) and tensor data (gguf_tensors.py)."""
