"""Text to tokens and batches: GPT-2 BPE through tiktoken (`tokenizer`), BPE from scratch
(`bpe`), Llama-family tokenizers from tokenizer.json or GGUF (`hf_tokenizer`), prompt templates
(`templates`), and the sliding-window datasets and loaders (`data`)."""
