"""Layers and models with their checkpoints' own tensor names: `nn` (`Module`, `Parameter`,
`Linear`, attention, the KV cache), `gpt` (`CausalLM`, `GPTConfig`, `GPT`), `llama` (`Llama`)."""
