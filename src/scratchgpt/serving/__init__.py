"""Serving: the OpenAI-compatible HTTP server and its playground, over a scheduler that steps the one
decoding engine (scratchgpt.inference) for every running request, in a thread or a process of its own."""
