"""Load generator for an OpenAI-compatible server (scripts/bench/serve_compare.sh runs it).

    python serve_load.py URL MODEL --clients 1 4 16 --requests 2 --max-tokens 64

For each concurrency C: C clients each send `--requests` streamed chat completions one after the
other (greedy, distinct prompts); prints one JSON line per C with the aggregate completion
tokens/s over the phase's wall time and the time to first token (first content chunk) p50/p99.
Completion tokens come from the stream's usage chunk when the server sends one, else one token per
content chunk (llama.cpp's server streams a chunk per token).
"""

import argparse
import json
import statistics
import threading
import time

import http.client
import urllib.parse

TOPICS = ["the sea", "mountains", "a city at night", "trains", "coffee", "the moon", "rivers",
          "libraries", "winter", "bicycles", "gardens", "music", "bridges", "the desert",
          "storms", "markets", "islands", "clocks", "bread", "forests"]


def one(url, model, prompt, max_tokens):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    host = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"{r.status}: {r.read()[:200]!r}")
    first, chunks, usage = None, 0, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
        for c in chunk.get("choices", []):
            if (c.get("delta") or {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
    conn.close()
    return first if first is not None else time.perf_counter() - start, usage or chunks


def phase(url, model, clients, requests, max_tokens):
    ttfts, tokens, lock = [], [0], threading.Lock()

    def run(c):
        for i in range(requests):
            topic = TOPICS[(c * requests + i) % len(TOPICS)]
            prompt = f"Write a short paragraph about {topic}."
            ttft, n = one(url, model, prompt, max_tokens)
            with lock:
                ttfts.append(ttft)
                tokens[0] += n

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts.sort()
    p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
    return {"clients": clients, "requests": len(ttfts), "completion_tokens": tokens[0],
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens[0] / wall, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 3), "ttft_p99_s": round(p99, 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    # One request first so that neither side's first-call costs land in the table.
    one(args.url, args.model, "Hello", 4)
    for c in args.clients:
        print(json.dumps(phase(args.url, args.model, c, args.requests, args.max_tokens)), flush=True)


if __name__ == "__main__":
    main()
