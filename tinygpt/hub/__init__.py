"""Pretrained weights: `load_pretrained` for every `--model` (a name, a hub folder, a run folder,
a .gguf), one adapter per model family (`gpt2`, `llama`), and cached, resumable downloads."""
