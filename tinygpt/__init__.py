"""tinygpt: a GPT built from first principles in NumPy."""
