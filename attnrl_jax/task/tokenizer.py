"""A small byte-level BPE tokenizer trained on the task's text, saved in Hugging Face format with a
DeepSeek-R1-style chat template, so that the trainer and evaluator load it like any checkpoint's.

Digits are split one per token; "\\n\\n" is a single token, so the separator table finds it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

# "<|endoftext|>" is the pad token, as in Qwen: a Qwen2 config.json makes transformers expect it.
SPECIAL = ["<|endoftext|>", "<|eos|>", "<|user|>", "<|assistant|>"]
# Plain (not special) tokens: decoding keeps them, as Qwen's does. "\n\n", the step separator, is one token
# whatever follows it (byte-level BPE would otherwise split it before a non-space character). Each of the
# task's four operations is one token too, so a step's result depends on the two tokens just before it
# ("7", "+2", "=" -> "9"): the warm start then learns the task within a few hundred steps on every seed
# instead of after a plateau of unpredictable length (benchmarks/RESULTS.md, "Built-in task").
ADDED = ["<think>", "</think>", "\n\n", "+1", "+2", "-1", "-2"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|eos|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], path: str, vocab_size: int = 384):
    """Trains the tokenizer on `texts`, saves it to `path` and returns the transformers tokenizer."""

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in ADDED])
    # (imported here: transformers loads torch where it is installed, about 2 s a process)
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|endoftext|>", model_max_length=4096
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
    return fast
