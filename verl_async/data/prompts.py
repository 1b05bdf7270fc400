"""Turn a PromptRow into what the engine receives, with the real prompt length.

Text: the chat template rendered to text, then encoded (the same on every transformers
version). VL prompts go through the model's processor (verl_async/data/vision.py).
"""

from verl_async.types import EnginePrompt, PromptRow


def encode_text_prompt(row: PromptRow, tokenizer) -> EnginePrompt:
    text = tokenizer.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return EnginePrompt(prompt_ids=list(ids))
