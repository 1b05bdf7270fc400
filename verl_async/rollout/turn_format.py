"""Observation text -> the tokens that follow a model turn, rendered by the model's chat template.

History is never re-tokenized: only the new text is. The template is rendered once per role
around placeholders to learn what it puts between the EOS that closes an assistant message and
the next generation prompt (for Qwen: "\\n<|im_start|>tool\\n" + text + "<|im_end|>\\n<|im_start|>assistant\\n").
"""

from dataclasses import dataclass

_ASSISTANT = "\ue000assistant\ue000"  # private-use characters: never in a real template
_OBSERVATION = "\ue001observation\ue001"


@dataclass
class TurnFormat:
    """How observations of one chat role are appended after a model turn."""

    tokenizer: object
    role: str
    prefix: str  # template text after the assistant's EOS, up to the observation's content
    suffix: str  # template text after the content, through the next generation prompt

    @classmethod
    def from_tokenizer(cls, tokenizer, role: str) -> "TurnFormat":
        """Raises ValueError when the template does not close an assistant message with EOS."""
        eos = tokenizer.eos_token
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": _ASSISTANT},
             {"role": role, "content": _OBSERVATION}], add_generation_prompt=True, tokenize=False)
        after = text.split(_ASSISTANT, 1)[-1] if _ASSISTANT in text else ""
        if not eos or not after.startswith(eos) or _OBSERVATION not in after:
            raise ValueError(f"the chat template does not render an assistant message as content + EOS ({eos!r}) "
                             f"followed by a {role!r} message: return observations as token ids instead, or "
                             "set data.env.observation_role to a role the template knows.")
        prefix, suffix = after[len(eos):].split(_OBSERVATION, 1)
        return cls(tokenizer, role, prefix, suffix)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def observation_ids(self, text: str, turn_ended_with_eos: bool) -> list[int]:
        """The tokens to append after a model turn: EOS (if the turn did not end on it), then the
        observation message and the next generation prompt."""
        ids = self.tokenizer(self.prefix + text + self.suffix, add_special_tokens=False)["input_ids"]
        return list(ids) if turn_ended_with_eos else [self.eos_token_id, *ids]
