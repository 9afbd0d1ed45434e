"""GGUF, llama.cpp's format: reading a file as a transformers model (``reader``), and writing lowbit's models in
llama.cpp's own types (``blocks`` encodes the weights, ``metadata`` the architecture and tokenizer, ``writer`` the
file)."""
