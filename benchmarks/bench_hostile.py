"""Hostile load on `scratchgpt serve`: normal streaming clients alone, then beside a mix of attacks (#25).

    python benchmarks/bench_hostile.py --checkpoint runs/cpu-baby
    python benchmarks/bench_hostile.py --checkpoint runs/cpu-baby --clients 8 --seconds 20 --attackers 2

The server runs as `python -m scratchgpt serve --api-key K` with its default limits. Phase one: the
normal clients (bench_serve.py's closed loops, streamed 200-token completions) alone. Phase two:
the same clients beside `--attackers` copies of each attack below, each in a loop:

    oversized     a 2 MB body with its Content-Length                         expect 413
    chunked       a 2 MB body in chunks, no Content-Length                    expect 413 (or a closed connection)
    two-framings  Content-Length and Transfer-Encoding both                   expect 400
    not-text      a prompt holding a lone surrogate                           expect 400
    no-key        no Authorization header                                     expect 401
    extreme       temperature 2, top_p 0.01, repetition_penalty 999, 16 stops of 256 characters   expect 200
    stalled       a streamed request whose reader never reads                 its slot freed; the server unhurt
    slowloris     a request line sent a byte at a time for 10 s, then dropped  a held connection, nothing more

Printed: the normal clients' tokens/s alone and attacked (the target: attacked >= 80% of alone),
/health's latency in both phases (target: under 1 s), the server's resident memory at the start and
at each quarter of each phase (target: flat), and each attack's answers by status (target: no 5xx).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench_serve import (
    ServerProcess,
    client_loop,
    failures,
    free_port,
    http_client,
    interval_figures,
    preflight,
)

KEY = "hostile-bench-key"
PROMPTS = ["ROMEO:", "JULIET:\nO ", "First Citizen:\n"]
BIG = b'{"prompt": "' + b"x" * 2_000_000 + b'", "max_tokens": 5}'


def raw_request(port: int, head: bytes, body: bytes, read: bool = True, timeout: float = 10.0) -> str:
    """Send bytes as they are; the answer's status, or what became of the connection."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(head + b"\r\n" + body)
            if not read:
                time.sleep(timeout)  # a reader that never reads
                return "held"
            answer = sock.recv(64)
            return answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"
    except (ConnectionError, TimeoutError, OSError):
        return "closed"


def head(path: str, *lines: str) -> bytes:
    """The request line and headers; raw_request adds the blank line that ends them."""
    return ("\r\n".join([f"POST {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {KEY}",
                         "Content-Type: application/json", *lines]) + "\r\n").encode()


def attacks(port: int) -> dict:
    """Each attack: a function that makes one attempt and says how it ended."""
    chunked = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in
                       (BIG[i:i + 65536] for i in range(0, len(BIG), 65536))) + b"0\r\n\r\n"
    framed = b'{"prompt": "ab", "max_tokens": 2}'
    surrogate = b'{"prompt": "ab\\ud800cd", "max_tokens": 2}'
    extreme = json.dumps({"prompt": "ROMEO:", "max_tokens": 50, "temperature": 2.0, "top_p": 0.01,
                          "repetition_penalty": 999.0, "stop": ["q" * 250 + str(i) for i in range(16)]}).encode()
    stalled = json.dumps({"prompt": "ROMEO:", "max_tokens": 2048, "stream": True}).encode()

    def slowloris() -> str:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                for byte in b"POST /v1/com":  # ten seconds of a request line, then gone
                    sock.send(bytes([byte]))
                    time.sleep(0.8)
            return "held 10 s"
        except OSError:
            return "closed"

    return {
        "oversized": lambda: raw_request(port, head("/v1/completions", f"Content-Length: {len(BIG)}"), BIG),
        "chunked": lambda: raw_request(port, head("/v1/completions", "Transfer-Encoding: chunked"), chunked),
        "two-framings": lambda: raw_request(port, head("/v1/completions", "Content-Length: 5",
                                                       "Transfer-Encoding: chunked"),
                                            f"{len(framed):x}\r\n".encode() + framed + b"\r\n0\r\n\r\n"),
        "not-text": lambda: raw_request(port, head("/v1/completions", f"Content-Length: {len(surrogate)}"), surrogate),
        "no-key": lambda: raw_request(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                            b"Content-Type: application/json\r\n", b"{}"),
        "extreme": lambda: raw_request(port, head("/v1/completions", f"Content-Length: {len(extreme)}"), extreme,
                                       timeout=30),
        "stalled": lambda: raw_request(port, head("/v1/completions", f"Content-Length: {len(stalled)}"), stalled,
                                       read=False, timeout=15),
        "slowloris": slowloris,
    }


async def attack_loop(name: str, attempt, outcomes: dict[str, Counter]) -> None:
    while True:
        outcome = await asyncio.to_thread(attempt)
        outcomes[name][outcome] += 1
        await asyncio.sleep(0.05)


async def health_loop(url: str, latencies: list[float]) -> None:
    async with http_client(url, 1, None, 30.0) as http:
        while True:
            start = time.perf_counter()
            with contextlib.suppress(Exception):
                await http.get("/health")
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.5)


async def phase(server: ServerProcess, port: int, args: argparse.Namespace, attacked: bool) -> dict:
    records, latencies, outcomes = [], [], {name: Counter() for name in attacks(port)}
    rss_start = server.rss_bytes()
    async with http_client(server.base_url, args.clients, KEY, 300.0) as http:
        tasks = [asyncio.create_task(client_loop(http, c, PROMPTS, args.max_tokens, records)) for c in range(args.clients)]
        tasks.append(asyncio.create_task(health_loop(server.base_url, latencies)))
        if attacked:
            tasks += [asyncio.create_task(attack_loop(name, attempt, outcomes))
                      for name, attempt in attacks(port).items() for _ in range(args.attackers)]
        try:
            await asyncio.sleep(args.warmup_seconds)
            start, quarters = time.perf_counter(), []
            for _ in range(4):  # the server's memory at each quarter of the window: flat, or growing?
                await asyncio.sleep(args.seconds / 4)
                quarters.append(round(server.rss_bytes() / 2**20, 1))
            end = time.perf_counter()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {"attacked": attacked, **interval_figures(records, start, end), **failures(records),
            "health_ms_p50": round(1000 * statistics.median(latencies), 1), "health_ms_max": round(1000 * max(latencies), 1),
            "rss_mb_start": round(rss_start / 2**20, 1), "rss_mb_quarters": quarters,
            "attacks": {name: dict(counts) for name, counts in outcomes.items()} if attacked else {}}


async def run(args: argparse.Namespace) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(args.checkpoint, port, ["--api-key", KEY], Path(tmp) / "server.log")
        try:
            await server.wait_healthy(KEY, 180.0)
            await preflight(server, PROMPTS, KEY, 60.0)
            alone = await phase(server, port, args, attacked=False)
            beside = await phase(server, port, args, attacked=True)
        finally:
            how = server.stop()
    ratio = beside["tokens_per_second"] / alone["tokens_per_second"] if alone["tokens_per_second"] else None
    five_hundreds = sum(n for counts in beside["attacks"].values() for status, n in counts.items() if status.startswith("5"))
    return {"alone": alone, "attacked": beside, "attacked_vs_alone": round(ratio, 3) if ratio else None,
            "attack_5xx": five_hundreds, "server_stopped": how}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clients", type=int, default=8, help="normal streaming clients (default 8)")
    parser.add_argument("--attackers", type=int, default=1, help="copies of each attack (default 1)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per phase (default 20)")
    parser.add_argument("--warmup-seconds", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
