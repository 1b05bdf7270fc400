"""A byte-level BPE tokenizer trained locally in seconds, with a Qwen-style chat template."""

import random

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    # Qwen3-VL's vision tokens, present in every asset so one tokenizer serves text and VL.
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Content is a string, or a list of parts {type: text|image}; images become the vision block
# that Qwen-VL processors expand into <|image_pad|> x (number of merged patches).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a an of to and in is it you that he was for on are as with his they at be this from have or by "
    "one had not but what all were when we there can your which their said if do will each about how up "
    "out them then she many some so these would other into has more her two like him see time could no "
    "make than first been its who now people my made over did down only way find use may water long "
    "little very after words called just where most know get through back much go good new write our "
    "used me man too any day same right look think also around another came come work three word must "
    "because does part even place well such here take why things help put years different away again "
    "reply answer digits only number count colour color red green blue yellow black white image shape "
    "triangle circle square angle side length area question solve find value geometry math"
).split()


def corpus(seed: int, lines: int = 4000) -> list[str]:
    """Deterministic training text: words, numbers and chat-like lines."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(3, 14)
        words = [rng.choice(_WORDS) if rng.random() < 0.75 else str(rng.randint(0, 999)) for _ in range(n)]
        out.append(" ".join(words) + rng.choice([".", "?", "!", ",", ""]))
    out += [" ".join(str(d) for d in rng.sample(range(10), 5)) for _ in range(500)]
    return out


def train_tokenizer(seed: int, vocab_size: int = 960):
    """Train a byte-level BPE and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )
