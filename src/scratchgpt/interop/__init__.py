"""Interop with the tools users already have: Hugging Face transformers (import and export, weights and
tokenizer) and llama.cpp / Ollama (GGUF export)."""
