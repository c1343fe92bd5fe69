"""PyTorch twin of `collie bench memory`: peak RSS of training steps of a randomly initialized
LlamaForCausalLM (f32, sdpa attention) with a reference optimizer, one configuration per process.

  python scripts/bench/torch_memory.py --preset small --optim lomo [--ckpt] [--steps 2]

Optimizers: torch.optim.AdamW / SGD, CoLLiE's Lion and Adan (collie-lm, loaded as in
scripts/fixtures/optim_ref.py), sophia-opt's SophiaG, lomo-optim's Lomo / AdaLomo (fused_backward).
--ckpt turns on transformers' gradient checkpointing. Prints one JSON line.
"""

import argparse
import json
import os
import resource
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fixtures"))

PRESETS = {
    "30m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2),
    "small": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--optim", default="adamw")
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048, **PRESETS[a.preset])
    model = LlamaForCausalLM(config).train()
    if a.ckpt:
        model.gradient_checkpointing_enable()
    params = sum(p.numel() for p in model.parameters())
    lr = 1e-5
    fused = a.optim in ("lomo", "adalomo")
    if a.optim == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    elif a.optim == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    elif a.optim in ("lion", "adan"):
        from optim_ref import Adan, Lion

        opt = (Lion if a.optim == "lion" else Adan)(model.parameters(), lr=lr)
    elif a.optim == "sophiag":
        from sophia_opt import SophiaG

        opt = SophiaG(model.parameters(), lr=lr)
    else:
        torch.Tensor.cuda = lambda self, *x, **k: self
        from lomo_optim import AdaLomo, Lomo

        opt = (Lomo if a.optim == "lomo" else AdaLomo)(model, lr=lr)
    times = []
    for _ in range(a.steps):
        ids = torch.randint(0, config.vocab_size, (1, a.seq_len))
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        if fused:
            opt.fused_backward(loss, lr)
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step_s = sorted(times[1:] or times)[len(times[1:] or times) // 2]
    print(json.dumps(dict(bench="torch_memory", preset=a.preset, optim=a.optim + ("+ckpt" if a.ckpt else ""), params=params,
                          peak_rss_bytes=peak, bytes_per_param=peak / params, tokens_per_s=a.seq_len / step_s)))


if __name__ == "__main__":
    main()
