"""Stand-in for Wan's umT5 encoder: ``T5Encoder`` (its constructor, dropout 0.1 on the way in and out) and
``T5EncoderModel`` (tokenizer + encoder, output trimmed to each caption's tokens, weights from a .pth)."""

import torch
from torch import nn

from .tokenizers import HuggingfaceTokenizer


class T5Encoder(nn.Module):
    def __init__(self, vocab, dim, dim_attn, dim_ffn, num_heads, num_layers, num_buckets, shared_pos=True,
                 dropout=0.1):
        super().__init__()
        self.token_embedding = vocab if isinstance(vocab, nn.Embedding) else nn.Embedding(vocab, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim_ffn), nn.GELU(),
                                                   nn.Linear(dim_ffn, dim)) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids, mask=None):
        x = self.dropout(self.token_embedding(ids))
        for block in self.blocks:
            x = x + block(x)
            # a masked mean over the caption: every token sees its context, padding sees nothing
            if mask is not None:
                m = mask.unsqueeze(-1).to(x)
                x = x + (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
        return self.dropout(self.norm(x))


class T5EncoderModel:
    def __init__(self, text_len, dtype=torch.bfloat16, device="cpu", checkpoint_path=None, tokenizer_path=None,
                 shard_fn=None, model=None):
        self.text_len, self.dtype, self.device = text_len, dtype, device
        self.checkpoint_path, self.tokenizer_path = checkpoint_path, tokenizer_path
        self.shard_fn = shard_fn
        self.model = model.to(dtype=self.dtype)
        self.tokenizer = HuggingfaceTokenizer(name=tokenizer_path, seq_len=text_len, clean="whitespace")

    def __call__(self, texts, device):
        ids, mask = self.tokenizer(texts, return_mask=True, add_special_tokens=True)
        ids, mask = ids.to(device), mask.to(device)
        seq_lens = mask.gt(0).sum(dim=1).long()
        context = self.model(ids, mask)
        return [u[:v] for u, v in zip(context, seq_lens)]

    def load_weight(self):
        self.model.load_state_dict(torch.load(self.checkpoint_path, map_location="cpu"))
        self.model = self.model.to(self.device).to(self.dtype)
