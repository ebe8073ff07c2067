"""Inference: the one decoding engine behind `generate`, `scratchgpt sample` and the server, and the
key-value cache it decodes over."""
