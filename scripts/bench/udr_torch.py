"""PyTorch twin of `recipe-udr --stage bench`: the same LM scoring pairs (transformers, SmolLM2 from
the GGUF file, left-padded length-sorted batches, mean NLL of the target tokens) and the same
retriever training batches (two all-MiniLM-L6-v2 towers through transformers' BertModel, [CLS]
vectors, UDR's list-wise + in-batch loss, AdamW), timed the same way. One JSON line on stdout.

Usage: python udr_torch.py <run dir> <LM: .gguf file or HF dir> <MiniLM model dir>
(the run dir holds bench/pairs.json and bench/train.json written by `recipe-udr --stage bench`)
"""
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer


def score(lm_path, pairs, batch, max_len):
    if os.path.isdir(lm_path):
        kw, d = {}, lm_path
    else:
        kw, d = {"gguf_file": os.path.basename(lm_path)}, os.path.dirname(lm_path)
    tok = AutoTokenizer.from_pretrained(d, **kw)
    lm = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw).eval()
    rows = []
    for p, t in pairs:
        # As collie-retrieval's tokenize_pair: the target capped, the prompt cut from the left.
        p, t = tok(p)["input_ids"], tok(t, add_special_tokens=False)["input_ids"][:max(max_len - 1, 1)]
        rows.append((p[max(len(p) - max(max_len - len(t), 1), 0):], t))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    out = [0.0] * len(rows)
    start = time.perf_counter()
    for k in range(0, len(order), batch):
        idx = order[k:k + batch]
        seqs = [rows[i][0] + rows[i][1] for i in idx]
        s = max(map(len, seqs))
        ids = torch.zeros(len(seqs), s, dtype=torch.long)
        mask = torch.zeros(len(seqs), s, dtype=torch.long)
        for r, q in enumerate(seqs):
            ids[r, s - len(q):] = torch.tensor(q)
            mask[r, s - len(q):] = 1
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=ids, attention_mask=mask).logits, -1)
        for r, i in enumerate(idx):
            t = rows[i][1]
            nll = -sum(logp[r, s - len(t) - 1 + j, tid].item() for j, tid in enumerate(t))
            out[i] = nll / len(t)
    return out, time.perf_counter() - start


def train(model_dir, data):
    tok = AutoTokenizer.from_pretrained(model_dir)
    q_enc, d_enc = AutoModel.from_pretrained(model_dir).train(), AutoModel.from_pretrained(model_dir).train()
    opt = torch.optim.AdamW(list(q_enc.parameters()) + list(d_enc.parameters()), lr=1e-4, weight_decay=0.0)
    bq, l, ml = data["batch_queries"], data["per_query"], data["max_len"]
    queries = data["queries"]
    rng = random.Random(0)
    start, steps, n = time.perf_counter(), 0, 0
    for k in range(0, len(queries) - bq + 1, bq):
        batch = queries[k:k + bq]
        cands = []
        for q in batch:
            pos = sorted(rng.sample(range(len(q["candidates"])), min(l, len(q["candidates"]))))
            cands += [q["candidates"][p].strip() for p in pos]
        enc = lambda m, t: m(**tok([x.strip() for x in t], padding=True, truncation=True, max_length=ml,
                                   return_tensors="pt")).last_hidden_state[:, 0]
        qv, cv = enc(q_enc, [q["query"] for q in batch]), enc(d_enc, cands)
        scores = qv @ cv.T
        b = scores.size(0)
        pred = torch.diagonal(scores.view(b, b, -1)).T
        ps, _ = pred.sort(descending=True, dim=-1)
        inv = 1.0 / torch.arange(1, pred.size(1) + 1)
        w = (inv.view(1, -1, 1) - inv.view(1, 1, -1)).abs()
        diffs = (pred[:, :, None] - pred[:, None, :]).clamp(-50, 50)
        rank = (F.softplus(-diffs) * w).triu(1).sum() / (b * pred.size(1) * (pred.size(1) - 1) / 2)
        loss = 4 * rank + F.cross_entropy(scores, torch.arange(b) * pred.size(1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(q_enc.parameters()) + list(d_enc.parameters()), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        n += len(batch)
    secs = time.perf_counter() - start
    return steps, n, secs


def main(run, lm_path, minilm):
    pairs = json.load(open(os.path.join(run, "bench", "pairs.json")))
    nll, score_secs = score(lm_path, pairs["pairs"], pairs["batch"], pairs["max_len"])
    diff = max(abs(a - b) for a, b in zip(nll, pairs["nll"]))
    steps, n, train_secs = train(minilm, json.load(open(os.path.join(run, "bench", "train.json"))))
    print(json.dumps(dict(impl="pytorch", torch=torch.__version__, threads=torch.get_num_threads(),
                          pairs=len(nll), score_seconds=score_secs, pairs_per_sec=len(nll) / score_secs,
                          max_nll_diff_vs_collie=diff, train_steps=steps, train_seconds=train_secs,
                          queries_per_sec=n / train_secs)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
