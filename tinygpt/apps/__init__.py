"""What a user runs on a finished model: a chat session (`chat`), an OpenAI-compatible server
(`serve`), the LLM judge client (`judge`), and pictures of what the code computes (`plots`)."""
