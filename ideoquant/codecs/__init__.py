"""Pure array code: float tensors to stored codes and back (ggml types, int8, NF4, FP8). No files, no options."""
