"""PyTorch twins of `collie bench forward|train` and `collie bench matmul` (`train` adds
clip_grad_norm_(1.0) and an AdamW step; `--lora R` trains peft LoRA adapters instead): same shapes, same timing
rule (median of the timed steps after one warm-up), one JSON line on stdout.

Usage:
  python torch_bench.py forward|train --preset tiny|20m|small --seq-len 256 --batch-size 4 --steps 5
  python torch_bench.py matmul --size 1024 --iters 20
  python torch_bench.py attention --attention naive|flash --seq-len 4096 --batch-size 1 --heads 32 --kv-heads 8 --head-dim 64
    (forward + backward of one causal GQA attention call: `naive` = transformers' eager path,
    repeat_kv + matmul + f32 softmax + matmul; `flash` = F.scaled_dot_product_attention with
    enable_gqa, PyTorch's fused kernel; the memory above the inputs, as `collie bench attention`)
"""

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F

PRESETS = {
    # Mirrors `preset()` in crates/collie-cli/src/bench.rs.
    "tiny": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, tie_word_embeddings=False),
    "20m": dict(vocab_size=49152, hidden_size=320, intermediate_size=864, num_hidden_layers=6, num_attention_heads=5,
                num_key_value_heads=5, tie_word_embeddings=True),
    "small": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def median(xs):
    return sorted(xs)[len(xs) // 2]


def forward(args, update=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**PRESETS[args.preset], max_position_embeddings=max(2048, args.seq_len + 1), rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).train()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules="all-linear"))
    b, s, v = args.batch_size, args.seq_len, cfg.vocab_size
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0) if update else None

    def step():
        ids = torch.randint(0, v, (b, s + 1))
        start = time.perf_counter()
        logits = model(input_ids=ids[:, :s]).logits
        loss = F.cross_entropy(logits.reshape(b * s, v), ids[:, 1:].reshape(b * s))
        loss.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed

    step()
    times = [step() for _ in range(args.steps)]
    m = median(times)
    print(json.dumps(dict(bench="train_step" if update else "forward_backward", impl="pytorch", torch=torch.__version__, threads=torch.get_num_threads(),
                          attn=cfg._attn_implementation, preset=args.preset,
                          params=sum(p.numel() for p in model.parameters()),
                          trainable_params=sum(p.numel() for p in trainable), lora=args.lora, batch_size=b, seq_len=s,
                          step_s_median=m, tokens_per_s=b * s / m, peak_rss_mib=peak_rss_mib())))


def matmul(args):
    n = args.size
    a, c = torch.randn(n, n), torch.randn(n, n)

    def once():
        start = time.perf_counter()
        a @ c
        return time.perf_counter() - start

    once()
    m = median([once() for _ in range(args.iters)])
    print(json.dumps(dict(bench="matmul", impl="pytorch", threads=torch.get_num_threads(), size=n, median_s=m,
                          gflops=2 * n**3 / m / 1e9)))


def current_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def attention(args):
    b, h, kvh, s, d = args.batch_size, args.heads, args.kv_heads, args.seq_len, args.head_dim
    q = torch.randn(b, h, s, d, requires_grad=True)
    k = torch.randn(b, kvh, s, d, requires_grad=True)
    v = torch.randn(b, kvh, s, d, requires_grad=True)
    before = current_rss_mib()

    def call():
        start = time.perf_counter()
        if args.attention == "naive":
            rep = h // kvh
            kk = k[:, :, None].expand(b, kvh, rep, s, d).reshape(b, h, s, d)
            vv = v[:, :, None].expand(b, kvh, rep, s, d).reshape(b, h, s, d)
            scores = (q @ kk.transpose(2, 3)) / d**0.5
            causal = torch.ones(s, s, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
            o = torch.softmax(scores, dim=-1, dtype=torch.float32) @ vv
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        o.sum().backward()
        q.grad = k.grad = v.grad = None
        return time.perf_counter() - start

    call()
    m = median([call() for _ in range(args.steps)])
    peak = peak_rss_mib()
    print(json.dumps(dict(bench="attention", impl="pytorch", torch=torch.__version__, threads=torch.get_num_threads(),
                          attention=args.attention, batch_size=b, seq_len=s, heads=h, kv_heads=kvh, head_dim=d,
                          step_s_median=m, peak_rss_mib=peak, rss_before_mib=before, attention_peak_mib=peak - before)))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ["forward", "train"]:
        f = sub.add_parser(name)
        f.add_argument("--preset", default="tiny")
        f.add_argument("--seq-len", type=int, default=256)
        f.add_argument("--batch-size", type=int, default=4)
        f.add_argument("--steps", type=int, default=5)
        f.add_argument("--lora", type=int, default=None, help="rank-R LoRA (alpha 2R) on every linear layer")
    m = sub.add_parser("matmul")
    m.add_argument("--size", type=int, default=1024)
    m.add_argument("--iters", type=int, default=20)
    a = sub.add_parser("attention")
    a.add_argument("--attention", choices=["naive", "flash"], default="flash")
    a.add_argument("--seq-len", type=int, default=2048)
    a.add_argument("--batch-size", type=int, default=1)
    a.add_argument("--heads", type=int, default=32)
    a.add_argument("--kv-heads", type=int, default=8)
    a.add_argument("--head-dim", type=int, default=64)
    a.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    if args.cmd == "matmul":
        matmul(args)
    elif args.cmd == "attention":
        attention(args)
    else:
        forward(args, update=args.cmd == "train")


if __name__ == "__main__":
    main()
