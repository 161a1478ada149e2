"""Stand-in for Wan's ``HuggingfaceTokenizer``: AutoTokenizer padded/truncated to ``seq_len``, whitespace-cleaned."""

import re

from transformers import AutoTokenizer


class HuggingfaceTokenizer:
    def __init__(self, name, seq_len=None, clean=None, **kwargs):
        self.name, self.seq_len, self.clean = name, seq_len, clean
        self.tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        self.vocab_size = self.tokenizer.vocab_size

    def __call__(self, sequence, **kwargs):
        return_mask = kwargs.pop("return_mask", False)
        options = {"return_tensors": "pt"}
        if self.seq_len is not None:
            options.update(padding="max_length", truncation=True, max_length=self.seq_len)
        options.update(kwargs)
        sequence = [sequence] if isinstance(sequence, str) else sequence
        if self.clean:
            sequence = [re.sub(r"\s+", " ", u).strip() for u in sequence]
        ids = self.tokenizer(sequence, **options)
        return (ids.input_ids, ids.attention_mask) if return_mask else ids.input_ids
