"""Locally built models and tokenizers (nothing is downloaded): tiny, counter, tiny-vl."""
