"""A small character-level GPT trained on examples/data/tiny.txt, once with pyflash and once with
PyTorch's scaled_dot_product_attention, printing both loss curves side by side.

Both runs start from the same weights and see the same batches, so the curves should agree to
rounding. Run from the repository root:

    PYTHONPATH=src python examples/train_gpt.py                 # 300 steps, CPU or GPU
    PYTHONPATH=src python examples/train_gpt.py --steps 100 --compile

The only pyflash-specific line is the attention call in ``CausalSelfAttention.forward``.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

import pyflash

DATA = Path(__file__).parent / "data" / "tiny.txt"
ATTENTION = ("pyflash", "sdpa")


@dataclass
class Config:
    vocab_size: int
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config, attention: str):
        super().__init__()
        self.n_head = config.n_head
        self.attention = attention
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seqlen, dim = x.shape
        qkv = self.qkv(x).view(batch, seqlen, 3, self.n_head, dim // self.n_head)
        if self.attention == "pyflash":
            # flash_attn's layout (batch, seqlen, 3, heads, head_dim): no transposes needed.
            y = pyflash.flash_attn_qkvpacked_func(qkv, causal=True)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # SDPA's (batch, heads, seqlen, head_dim)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        return self.proj(y.reshape(batch, seqlen, dim))


class Block(nn.Module):
    def __init__(self, config: Config, attention: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, attention)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: Config, attention: str):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*(Block(config, attention) for _ in range(config.n_layer)))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        logits = self.head(self.ln_f(self.blocks(x)))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def load_text(path: Path = DATA):
    text = path.read_text()
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long), len(vocab)


def train(attention: str, steps: int = 300, batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
          device: str = "cpu", compile: bool = False, config_overrides: dict | None = None) -> List[float]:
    """Train from a fixed seed and return the loss of every step."""
    data, vocab_size = load_text()
    config = Config(vocab_size=vocab_size, **(config_overrides or {}))
    torch.manual_seed(seed)
    model = GPT(config, attention).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    step_fn = torch.compile(model, fullgraph=True) if compile else model
    batches = torch.Generator().manual_seed(seed)  # same batches for every attention
    use_bf16 = device.startswith("cuda")
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - config.block_size - 1, (batch_size,), generator=batches)
        window = torch.stack([data[s:s + config.block_size + 1] for s in starts.tolist()]).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = step_fn(window[:, :-1], window[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile(model, fullgraph=True)")
    parser.add_argument("--every", type=int, default=25, help="print every N steps")
    args = parser.parse_args()

    curves = {}
    for attention in ATTENTION:
        start = time.perf_counter()
        curves[attention] = train(attention, args.steps, args.batch_size, device=args.device,
                                  compile=args.compile)
        print(f"{attention}: {args.steps} steps in {time.perf_counter() - start:.1f} s")
    print(f"\n{'step':>6} {'pyflash':>10} {'sdpa':>10} {'|diff|':>10}")
    for step in range(0, args.steps, args.every):
        ours, ref = curves["pyflash"][step], curves["sdpa"][step]
        print(f"{step:>6} {ours:>10.4f} {ref:>10.4f} {abs(ours - ref):>10.2e}")
    final = curves["pyflash"][-1], curves["sdpa"][-1]
    print(f"{args.steps - 1:>6} {final[0]:>10.4f} {final[1]:>10.4f} {abs(final[0] - final[1]):>10.2e}")
    print(f"\nuniform-guess loss ln(vocab) = {math.log(load_text()[1]):.4f}; "
          f"max |diff| over all steps = {max(abs(a - b) for a, b in zip(*curves.values())):.2e}")


if __name__ == "__main__":
    main()
