"""Prompt rows: loading parquet/JSONL in the common RL layout, generated tasks, prompt building."""
