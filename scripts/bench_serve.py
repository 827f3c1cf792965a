"""Load test for an OpenAI-compatible server (edgelm serve --http, llama-server, ...).

Throughput and TTFT percentiles at several concurrency levels, streaming chat completions on
loopback, each client sending its next request when the last one ended:

    bench_serve.py http://127.0.0.1:8080 --concurrency 1,2,4,8 --requests 32 --max-tokens 64

Soak (edgelm only: reads its /metrics): N requests from C clients, a share of them dropped
after their first chunk; reports 5xx answers and the server's resident memory before and after:

    bench_serve.py http://127.0.0.1:8080 --soak 10000 --concurrency 8 --disconnect 0.1

Standard library only, so it runs anywhere Python does.
"""

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "Set the kitchen heater to 21.5 degrees at 7pm",
    "Turn off every light on the ground floor",
    "Is the garage door open?",
    "Start the dishwasher in eco mode after 10pm",
    "Dim the bedroom lamp to thirty percent",
    "Lock the front door and arm the alarm",
    "What is the humidity in the bathroom?",
    "Open the living room blinds halfway",
]


def one_request(host, port, body, disconnect_after_first=False):
    """Sends one streaming chat request; returns (status, ttft seconds or None, tokens).

    TTFT is the time to the first chunk (servers send it with the first token); tokens come
    from the usage chunk the request asks for."""
    conn = http.client.HTTPConnection(host, port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        resp.read()
        conn.close()
        return resp.status, None, 0
    ttft, tokens = None, 0
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        msg = json.loads(data)
        if msg.get("error"):
            conn.close()
            return 599, ttft, tokens
        if msg.get("usage"):
            tokens = msg["usage"]["completion_tokens"]
        if ttft is None and msg.get("choices"):
            ttft = time.perf_counter() - start
            if disconnect_after_first:
                conn.close()
                return 200, ttft, tokens
    conn.close()
    return 200, ttft, tokens


def usage_tokens(host, port, body):
    """Completion tokens of one non-streamed request with the same settings (for tokens/s)."""
    b = dict(body)
    b["stream"] = False
    b.pop("stream_options", None)
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(b), headers={"Content-Type": "application/json"})
    r = json.loads(conn.getresponse().read())
    conn.close()
    return r["usage"]["completion_tokens"]


def body_for(i, args):
    return {
        "model": args.model,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": args.max_tokens,
        # Sampled with a seed per request: no response cache hit, every answer generated, and
        # all of max_tokens (llama-server and edgelm both take ignore_eos).
        "temperature": 0.7,
        "seed": i,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def run_level(host, port, clients, requests, args):
    results, lock = [], threading.Lock()
    counter = iter(range(requests))

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            status, ttft, chunks = one_request(host, port, body_for(i, args))
            with lock:
                results.append((status, ttft, chunks))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r[0] == 200 and r[1] is not None]
    ttfts = sorted(r[1] for r in ok)
    pct = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] * 1e3 if ttfts else float("nan")
    tokens = sum(r[2] for r in ok)
    return {
        "clients": clients,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": pct(0.5),
        "ttft_p99_ms": pct(0.99),
        "ttft_mean_ms": statistics.mean(ttfts) * 1e3 if ttfts else float("nan"),
    }


def rss(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for line in text.splitlines():
        if line.startswith("edgelm_resident_memory_bytes "):
            return float(line.split()[1])
    return float("nan")


def soak(host, port, args):
    clients = max(int(c) for c in args.concurrency.split(","))
    rng = random.Random(7)
    plan = [rng.random() < args.disconnect for _ in range(args.soak)]
    statuses, lock = {}, threading.Lock()
    # A warm-up at full concurrency (--warmup requests) so that allocator arenas and thread
    # pools reach their working size before memory is measured.
    counter = iter(range(args.warmup))

    def warm():
        while next(counter, None) is not None:
            one_request(host, port, body_for(0, args))

    threads = [threading.Thread(target=warm) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counter = iter(range(args.soak))
    before = rss(host, port)

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                status = one_request(host, port, body_for(i, args), disconnect_after_first=plan[i])[0]
            except OSError:
                status = "connection error"
            with lock:
                statuses[status] = statuses.get(status, 0) + 1

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1.0)
    after = rss(host, port)
    fivexx = sum(n for s, n in statuses.items() if isinstance(s, int) and s >= 500)
    return {
        "requests": args.soak,
        "disconnected_on_purpose": sum(plan),
        "statuses": {str(k): v for k, v in statuses.items()},
        "server_errors_5xx": fivexx,
        "wall_s": time.perf_counter() - start,
        "rss_before_mib": before / 2**20,
        "rss_after_mib": after / 2**20,
        "rss_growth_mib": (after - before) / 2**20,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base_url")
    p.add_argument("--model", default="default")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--soak", type=int, default=0, help="run a soak of this many requests instead")
    p.add_argument("--disconnect", type=float, default=0.1, help="share of soak requests dropped mid-answer")
    p.add_argument("--warmup", type=int, default=1000, help="soak requests run before memory is measured")
    args = p.parse_args()
    u = urllib.parse.urlparse(args.base_url)
    host, port = u.hostname, u.port or 80
    if args.soak:
        print(json.dumps(soak(host, port, args)))
        return
    tokens = usage_tokens(host, port, body_for(0, args))
    print(f"# {args.base_url}: chat, {args.max_tokens} new tokens (about {tokens} per answer), "
          f"{args.requests} requests per level", file=sys.stderr)
    for c in [int(x) for x in args.concurrency.split(",")]:
        r = run_level(host, port, c, args.requests, args)
        print(json.dumps(r))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
