"""Using a model: sampling and streaming (`generate`), and weights packed once for generation
as float32 rows, int8 or GGUF blocks (`pack`)."""
