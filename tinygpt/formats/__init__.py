"""File formats read without torch or pickle, every length bounded by the file: safetensors
(read and written) and GGUF v3 (read; its quantized blocks are decoded by `kernels.quant`)."""
