"""A tiny causal GPT in the style of nanoGPT, small enough to pretrain on a laptop CPU in minutes.

It follows GPT-2 (Radford et al., 2019) as nanoGPT (Karpathy) writes it: token and position embeddings,
pre-LayerNorm blocks of causal self-attention and an MLP, a final LayerNorm, and an output head tied to the token
embedding. The module names are GPT-2's (`wte`, `wpe`, `h`, `ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`,
`mlp.c_fc`, `mlp.c_proj`, `ln_f`, `lm_head`), so adapter target patterns written for GPT-2 work here. One addition
to nanoGPT: a key/value cache (KVCache) for batched greedy decoding in `generate`.

Shapes: B = batch, T = sequence length, C = n_embd, nh = n_head, hs = C // nh (head size), V = vocab_size. The model
never names a device: it runs wherever its parameters and inputs are.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class KVCache:
    """Each layer's keys and values so far, which never change once computed (the model is causal), so a decoding
    step feeds one new token, not the whole sequence. Prompts of different lengths are left-padded; `real` marks
    the padding, which no real token sees and positions skip: each prompt decodes as alone (up to float rounding)."""

    def __init__(self, n_layer, real):
        self.k, self.v = [None] * n_layer, [None] * n_layer  # per layer: (B, nh, T_seen, hs) each
        self.real = real  # (B, T_prompt) bool, False on left padding

    def extend(self, layer, k, v):
        """Append the new tokens' keys and values at `layer`; return those of every token so far."""
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)  # (B, nh, T_seen + T, hs)
            v = torch.cat([self.v[layer], v], dim=2)  # (B, nh, T_seen + T, hs)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def positions_and_mask(self, T):
        """Positions (B, T) of the T tokens about to be fed, and their attention mask (B, 1, T, T_seen + T): the
        first call feeds the whole (padded) prompt, later calls one new, real token each."""
        if self.k[0] is None:  # nothing seen yet
            if T != self.real.size(1):
                raise ValueError(f"feed the whole prompt first: got T={T}, prompt length {self.real.size(1)}")
            pos = (self.real.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T): count real tokens only
            causal = torch.ones(T, T, dtype=torch.bool, device=self.real.device).tril()  # (T, T)
            itself = torch.eye(T, dtype=torch.bool, device=self.real.device)  # (T, T)
            # A real token sees earlier real tokens; a padding token sees only itself (a row with
            # nothing to attend to would give NaN), and no real token ever sees it.
            mask = causal & (self.real[:, None, :] | itself)  # (B, T, T)
            return pos, mask[:, None]  # (B, T), (B, 1, T, T)
        if T != 1:
            raise ValueError(f"after the prompt, feed one token at a time (got T={T})")
        self.real = torch.cat([self.real, self.real.new_ones(self.real.size(0), 1)], dim=1)  # (B, T_seen + 1)
        pos = self.real.sum(dim=1, keepdim=True) - 1  # (B, 1)
        return pos, self.real[:, None, None, :]  # (B, 1), (B, 1, 1, T_seen + 1)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where token t only sees tokens 0..t."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, cache=None, layer=0):
        """x (B, T, C). Without a cache: plain causal attention. With one (decoding): the keys and values
        of earlier tokens come from `cache`, and `mask` (B, 1, T, T_seen + T) says who sees whom."""
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # (B, nh, T_seen + T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=mask is None
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: widen 4x, GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 256  # longest sequence (context) in tokens; one toy task fits in about 200 characters
    vocab_size: int = 96  # the character tokenizer's alphabet: newline + printable ASCII
    n_layer: int = 4  # number of transformer blocks
    n_head: int = 4  # attention heads per block; must divide n_embd
    n_embd: int = 128  # width C; adapters see linears of shape C -> 3C, C -> C, C -> 4C and 4C -> C
    dropout: float = 0.0  # no dropout: the models are small and trained briefly
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2


class GPT(nn.Module):
    """The language model: embeddings, `n_layer` blocks, final LayerNorm, tied output head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf, 2017): the head reuses wte
        self.apply(self._init_weights)
        # GPT-2's scaled init: the projections that write into the residual stream get std 0.02 / sqrt(2 L).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Number of parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache=None):
        """Next-token logits (B, T, V) for every position, and the mean cross-entropy over the counted positions
        if `targets` are given (else None).

        Args:
            idx: (B, T) token ids.
            targets: (B, T) the token that should follow each position; -1 marks positions left out of the
                loss (prompt tokens and padding during fine-tuning).
            cache: a KVCache, for decoding (see `generate`); None for an ordinary full pass.
        """
        B, T = idx.size()
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}")
            pos, mask = torch.arange(T, device=idx.device), None  # (T,); causal attention
        else:  # decoding; generate() keeps every position below block_size
            pos, mask = cache.positions_and_mask(T)  # (B, T), (B, 1, T, T_seen + T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, i)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, stop=None, lengths=None):
        """Greedy decoding: append the most likely next token, `max_new_tokens` times at most. Returns (B, T + n),
        the prompts followed by n <= max_new_tokens generated tokens.

        Args:
            idx: (B, T) prompt token ids, shorter prompts left-padded (any id).
            max_new_tokens: most tokens to add; also capped so the longest prompt stays within block_size.
            stop: optional list of token ids (e.g. those of "\\n\\n"): decoding ends once every row has
                produced it, so callers cut each row at its first stop sequence.
            lengths: (B,) real prompt lengths; None means no padding.
        """
        B, T = idx.size()
        lengths = torch.full((B,), T, device=idx.device) if lengths is None else lengths.to(idx.device)
        if int(lengths.max()) >= self.config.block_size:
            raise ValueError(f"a prompt of {int(lengths.max())} tokens leaves no room to generate within "
                             f"block_size={self.config.block_size}")
        max_new_tokens = min(max_new_tokens, self.config.block_size - int(lengths.max()))
        real = torch.arange(T, device=idx.device)[None, :] >= (T - lengths)[:, None]  # (B, T): left padding False
        cache = KVCache(self.config.n_layer, real)
        stop = None if not stop else torch.tensor(stop, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)  # (B,)
        new = idx  # the tokens not yet seen by the model: the whole prompt first, then one token per step
        for n in range(1, max_new_tokens + 1):
            logits, _ = self(new, cache=cache)  # (B, T_new, V)
            new = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (B, 1)
            idx = torch.cat([idx, new], dim=1)  # (B, T + n)
            if stop is not None and n >= len(stop):  # look for the stop sequence among new tokens only
                done |= (idx[:, -len(stop):] == stop).all(dim=1)
                if done.all():
                    break
        return idx
