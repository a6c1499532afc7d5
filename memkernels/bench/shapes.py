"""Parameter shapes used by the benchmarks."""
from __future__ import annotations


def gpt2_small() -> list[tuple[int, ...]]:
    """The 148 parameter tensors of GPT-2 small (124M parameters), in the order of its state_dict."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,),                  # ln_1
                   (d, 3 * d), (3 * d,),        # attn.c_attn
                   (d, d), (d,),                # attn.c_proj
                   (d,), (d,),                  # ln_2
                   (d, 4 * d), (4 * d,),        # mlp.c_fc
                   (4 * d, d), (d,)]            # mlp.c_proj
    return shapes + [(d,), (d,)]               # ln_f
