"""Trainer workers: model build (FSDP2 on GPU, plain/gloo on CPU), batching, checkpoints."""
