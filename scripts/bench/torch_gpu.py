"""PyTorch twin of `collie --device cuda bench memory --preset 1b --dtype bf16` on the same GPU:
transformers' LlamaForCausalLM (sdpa attention) with f32 master weights under bf16 autocast,
torch.optim.AdamW(fused=True), random tokens, no clipping. Prints one JSON line with tokens/s
(median of the steps after the first), MFU by the same FLOP count as collie
(`collie_train::metrics::flops_per_token` over the parameters but the
untied embedding table, as `collie bench memory` counts them) and the allocator's peak.

  python scripts/bench/torch_gpu.py --seq-len 2048 --batch-size 4 --steps 30 [--peak-tflops 989]
  python scripts/bench/torch_gpu.py --parity FIXTURE_DIR   # 20-step bf16 loss trajectory (see below)

--parity trains tests/fixtures/train/model on io.jsonl exactly as scripts/fixtures/train_hf.py's
`adamw_bf16` case, but on the GPU, and prints its per-step losses: the same-run reference for the
CUDA bf16 parity check of scripts/gpu-check.sh.
"""

import argparse
import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}


def flops_per_token(c, seq_len):
    d, heads, layers = c.hidden_size, c.num_attention_heads, c.num_hidden_layers
    hd = d // heads
    kv = c.num_key_value_heads * hd
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * c.intermediate_size + 2 * d
    n = layers * per_layer + d + d * c.vocab_size
    return 6 * n + 12 * layers * heads * hd * seq_len


def bench(a):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    config = LlamaConfig(max_position_embeddings=max(2048, a.seq_len), **PRESETS[a.preset])
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", torch_dtype=torch.float32).to(dev).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    times = []
    for _ in range(a.steps):
        ids = torch.randint(0, config.vocab_size, (a.batch_size, a.seq_len), device=dev)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = sorted(times[1:] or times)
    step_s = timed[len(timed) // 2]
    tps = a.batch_size * a.seq_len / step_s
    fpt = flops_per_token(config, a.seq_len)
    print(json.dumps(dict(bench="torch_gpu", preset=a.preset, params=params, seq_len=a.seq_len, batch_size=a.batch_size,
                          dtype="bf16-autocast", attention="sdpa", step_s=step_s, step_s_all=times, tokens_per_s=tps,
                          flops_per_token=fpt, mfu=tps * fpt / (a.peak_tflops * 1e12),
                          max_memory_allocated=torch.cuda.max_memory_allocated(),
                          max_memory_reserved=torch.cuda.max_memory_reserved(),
                          gpu=torch.cuda.get_device_name(), torch=torch.__version__)))


def parity(a):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fixtures"))
    import train_hf

    losses = train_hf.bf16_trajectory(a.parity, device="cuda")
    print(json.dumps(dict(bench="torch_bf16_parity", losses=losses, gpu=torch.cuda.get_device_name())))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--parity", help="tests/fixtures/train: print the bf16 trajectory on the GPU")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("torch_gpu.py: no GPU (torch.cuda.is_available() is False)")
    parity(a) if a.parity else bench(a)


if __name__ == "__main__":
    main()
