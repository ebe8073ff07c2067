"""Load test of `scratchgpt serve`: many streaming clients at once, then a long soak (#17).

    python benchmarks/bench_serve.py --checkpoint runs/baby
    python benchmarks/bench_serve.py --checkpoint runs/baby --clients 1 4 16 32 --seconds 30 --max-tokens 200 \\
        --port 8123 --server-args "--max-tokens-cap 500" --api-key K
    python benchmarks/bench_serve.py --checkpoint runs/baby --soak-seconds 600 --clients 16

The script starts `python -m scratchgpt serve --checkpoint C --port P <--server-args>` as a
subprocess, waits for GET /health, sends each prompt once (a wrong prompt or key stops the run
before any load), drives the server, stops it (SIGTERM, SIGKILL after 10 s) and prints one JSON
object to stdout and a Markdown table to stderr.

Every client is a closed loop: it sends one streamed POST /v1/completions, reads it to
`data: [DONE]`, and sends the next. Each request asks for `max_tokens` at temperature 0.8 with
`stream_options: {"include_usage": true}`, seed = client index * 1000 + request number (so a run
is repeatable), and one of a few prompts in turn. A 429 is not an error: the client waits for
its Retry-After (at most 5 s) and goes on. Anything else that is not a 200 followed by a
complete stream is an error.

Load mode (default): for each --clients count, that many clients run for --warmup-seconds
(not measured: the server's first passes and the clients' start-up), then for --seconds (the
window). When the window closes, requests still in flight are cancelled (not errors) and the
next count starts on the same server. Per client count:

    tokens_per_second       completion tokens streamed inside the window / --seconds. A text
                            event may carry several tokens (the server holds characters back
                            while they could still become a stop string, or a partial UTF-8
                            character), so each event counts as the request's
                            usage.completion_tokens / its text events (1 while that is unknown).
    finished_tokens_per_second   usage.completion_tokens of the requests that finished inside the
                            window / --seconds: the literal count. It swings when requests are
                            long beside the window (a server that advances all requests in
                            lock-step finishes them all at once), hence the figure above.
    speedup_vs_1_client     tokens_per_second / the 1-client tokens_per_second of this run.
    requests_completed      requests whose [DONE] arrived inside the window.
    errors, rate_limited    failed requests and 429s over the whole phase, warm-up included.
    ttft_ms p50/p99         time to first token: request sent -> first data event carrying text,
                            for first tokens that arrived inside the window.
    itl_ms p50/p99          inter-token latency: the gap between successive text events of one
                            request (what a reader sees), for gaps ending inside the window.
    tokens_per_text_event   how many tokens an ITL gap spans on average (1.0: one per event).
    server_cpu_percent, client_cpu_percent   CPU used in the window (100 = one core); on a small
                            machine the clients compete with the server, and this shows by how much.
    server_rss_mb           the server's resident memory (its process and children) at the end.

Soak mode (--soak-seconds N, one --clients count, default 16): the clients run for N seconds
without a break, and every --sample-seconds (10) the script samples the server's resident memory
(psutil: the process and its children) and the cumulative errors and 429s, plus the tokens/s,
completions, TTFT and ITL of the interval. It reports rss_after_warmup_mb (the first sample at
or after --soak-warmup seconds, 60 by default: by then the allocator and caches have settled),
rss_max_mb and rss_last_mb from then on, their growth in % over the warm-up figure, and passes
(exit status 0) when errors == 0 and the largest growth is within --rss-tolerance (10 %).

The clients run in this process (asyncio, one httpx.AsyncClient): on a machine with few cores
they take CPU from the server, which client_cpu_percent makes visible.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "KING RICHARD III:"]
TEMPERATURE = 0.8
SEED_STRIDE = 1000  # seed = client * SEED_STRIDE + request number
MAX_RETRY_AFTER_S = 5.0  # a 429's Retry-After is honoured up to this
ERROR_PAUSE_S = 0.2  # after an error, so a dead server is not hammered in a tight loop
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this


# --- one request ---------------------------------------------------------------------------------------------------

@dataclass
class RequestRecord:
    """What one completion request did, in time.perf_counter() seconds."""

    client: int
    seed: int
    sent: float
    text_times: list[float] = field(default_factory=list)  # arrival of each data event carrying text
    completion_tokens: int | None = None  # from the usage event
    finished: float | None = None  # [DONE] arrived; None while in flight or when cut at the window's end
    error: str | None = None
    rate_limited: bool = False
    retry_after: float = 0.0

    def tokens_per_event(self) -> float:
        """Tokens carried by each text event: usage / events once known, else 1 (a CharTokenizer's rule)."""
        if self.completion_tokens is not None and self.text_times:
            return self.completion_tokens / len(self.text_times)
        return 1.0


def request_body(prompt: str, max_tokens: int, seed: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": TEMPERATURE, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(response.headers.get("retry-after", "1"))))
    except ValueError:  # an HTTP date instead of seconds: wait a second
        return 1.0


async def stream_one(http: httpx.AsyncClient, body: dict, record: RequestRecord) -> None:
    """Send one streamed completion and fill `record` as its events arrive; never raises for HTTP trouble."""
    done = False
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code == 429:
                record.rate_limited = True
                record.retry_after = _retry_after(response)
                await response.aread()
                return
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                record.error = f"HTTP {response.status_code}: {text[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": ping")
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:  # an error reported inside a 200 stream
                    record.error = f"error event: {json.dumps(event['error'])[:200]}"
                    return
                if any(choice.get("text") for choice in event.get("choices") or ()):
                    record.text_times.append(time.perf_counter())
                if event.get("usage"):
                    record.completion_tokens = event["usage"].get("completion_tokens")
        if not done:
            record.error = "stream ended before data: [DONE]"
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: an event that is not JSON
        record.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if done and record.error is None:
            record.finished = time.perf_counter()


async def client_loop(http: httpx.AsyncClient, client: int, prompts: list[str], max_tokens: int,
                      records: list[RequestRecord]) -> None:
    """One closed-loop client: a request, then the next as soon as it is done, until cancelled."""
    number = 0
    while True:
        seed = client * SEED_STRIDE + number
        # Appended before it is sent, so a request cut by the window's end is still seen (as cut, not failed).
        record = RequestRecord(client, seed, time.perf_counter())
        records.append(record)
        await stream_one(http, request_body(prompts[(client + number) % len(prompts)], max_tokens, seed), record)
        number += 1
        if record.rate_limited:
            await asyncio.sleep(record.retry_after)
        elif record.error:
            await asyncio.sleep(ERROR_PAUSE_S)


def http_client(base_url: str, clients: int, api_key: str | None, read_timeout: float) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # One connection per client (plus room for the odd extra), and no pool timeout: a client
    # waits only for the server, never for another client's connection.
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(connect=10.0, read=read_timeout, write=10.0, pool=None)
    return httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=timeout)


# --- figures -------------------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between the closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def interval_figures(records: list[RequestRecord], start: float, end: float) -> dict:
    """What happened in [start, end): tokens streamed, requests finished, latencies that ended there.

    Every figure is attributed to the time it ended (a token when it arrived, a TTFT when the first
    text arrived, a request when [DONE] arrived), so intervals next to each other never count twice.
    """
    streamed_tokens = 0.0
    finished_tokens = 0
    completed = 0
    ttft: list[float] = []
    gaps: list[float] = []
    event_tokens: list[float] = []
    for record in records:
        if record.sent >= end or (record.finished is not None and record.finished < start):
            continue
        times = record.text_times
        first = bisect.bisect_left(times, start)
        last = bisect.bisect_left(times, end)
        streamed_tokens += (last - first) * record.tokens_per_event()
        # The gap ending at event i is times[i] - times[i - 1]; event 0 has no gap, it has a TTFT.
        gaps.extend(times[i] - times[i - 1] for i in range(max(first, 1), last))
        if first == 0 and last > 0:
            ttft.append(times[0] - record.sent)
        if record.finished is not None and start <= record.finished < end:
            completed += 1
            finished_tokens += record.completion_tokens if record.completion_tokens is not None else len(times)
            if record.completion_tokens is not None and times:
                event_tokens.append(record.tokens_per_event())
    seconds = end - start
    return {
        "tokens_per_second": round(streamed_tokens / seconds, 2),
        "finished_tokens_per_second": round(finished_tokens / seconds, 2),
        "requests_completed": completed,
        "ttft_ms": {"p50": _ms(percentile(ttft, 50)), "p99": _ms(percentile(ttft, 99))},
        "itl_ms": {"p50": _ms(percentile(gaps, 50)), "p99": _ms(percentile(gaps, 99))},
        "tokens_per_text_event": round(sum(event_tokens) / len(event_tokens), 3) if event_tokens else None,
    }


def failures(records: list[RequestRecord]) -> dict:
    """Errors and 429s so far, with the first few error messages (they say what broke)."""
    errors = [record.error for record in records if record.error]
    return {"errors": len(errors), "rate_limited": sum(record.rate_limited for record in records),
            "first_errors": list(dict.fromkeys(errors))[:5]}


# --- the server process --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m scratchgpt serve` as a subprocess in its own process group, logging to a file."""

    def __init__(self, checkpoint: str, port: int, server_args: list[str], log_path: Path):
        self.command = [sys.executable, "-m", "scratchgpt", "serve", "--checkpoint", checkpoint,
                        "--port", str(port), *server_args]
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")  # a file, not a pipe: uvicorn logs every request and a full pipe would stall it
        # Its own session: Ctrl-C reaches only this script, whose `finally` then stops the server.
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.ps = psutil.Process(self.process.pid)

    def exited(self) -> bool:
        return self.process.poll() is not None

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int:
        """Resident memory of the server and its children (a multi-process server counts whole)."""
        total = 0
        for proc in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_info().rss
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    async def wait_healthy(self, api_key: str | None, timeout: float) -> dict:
        """Poll GET /health until it answers 200; the server's answer, or SystemExit with its log."""
        deadline = time.perf_counter() + timeout
        async with http_client(self.base_url, 1, api_key, 10.0) as http:
            while time.perf_counter() < deadline:
                if self.exited():
                    raise SystemExit(f"the server exited with status {self.process.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    response = await http.get("/health")
                    if response.status_code == 200:
                        return response.json()
                await asyncio.sleep(0.25)
        raise SystemExit(f"no answer from {self.base_url}/health within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> str:
        """SIGTERM to the process group (uvicorn shuts down cleanly), SIGKILL if it is still there; how it ended."""
        how = f"had already exited with status {self.process.returncode}" if self.exited() else "SIGTERM"
        if not self.exited():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                how = f"SIGKILL (still running {STOP_GRACE_S:g} s after SIGTERM)"
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            # Status 0 or -15 are both clean stops: uvicorn may re-raise the SIGTERM once its shutdown is done.
            how += f", exit status {self.process.returncode}"
        self.log.close()
        return how


async def preflight(server: ServerProcess, prompts: list[str], api_key: str | None, read_timeout: float) -> None:
    """Each prompt once, unstreamed and one token long: a prompt outside the vocabulary, a wrong
    key or a refused field stops the run here, rather than as thousands of errors under load."""
    async with http_client(server.base_url, 1, api_key, read_timeout) as http:
        for prompt in prompts:
            response = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "seed": 0})
            if response.status_code != 200:
                raise SystemExit(f"the server refused prompt {prompt!r}: HTTP {response.status_code} {response.text[:300]}")


# --- load mode -----------------------------------------------------------------------------------------------------

async def run_phase(server: ServerProcess, clients: int, args: argparse.Namespace) -> dict:
    """`clients` clients for the warm-up and the window; the window's figures."""
    records: list[RequestRecord] = []
    async with http_client(server.base_url, clients, args.api_key, args.timeout) as http:
        tasks = [asyncio.create_task(client_loop(http, client, args.prompts, args.max_tokens, records))
                 for client in range(clients)]
        try:
            await asyncio.sleep(args.warmup_seconds)
            window_start = time.perf_counter()
            server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
            await asyncio.sleep(args.seconds)
            window_end = time.perf_counter()
            server_cpu, client_cpu = server.cpu_seconds() - server_cpu, time.process_time() - client_cpu
        finally:
            # Cancelling closes each open stream, so the server stops those generations too.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    if server.exited():
        raise SystemExit(f"the server exited during the {clients}-client phase:\n{server.log_tail()}")
    seconds = window_end - window_start
    return {
        "clients": clients,
        **interval_figures(records, window_start, window_end),
        **failures(records),
        "requests_cut_at_window_end": sum(r.finished is None and not r.error and not r.rate_limited for r in records),
        "server_cpu_percent": round(100 * server_cpu / seconds, 1),
        "client_cpu_percent": round(100 * client_cpu / seconds, 1),
        "server_rss_mb": round(server.rss_bytes() / 2**20, 1),
    }


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def load_table(results: list[dict]) -> str:
    rows = ["| clients | tokens/s | vs 1 client | requests | errors | 429s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r['clients']} | {_fmt(r['tokens_per_second'])} | {_fmt(r['speedup_vs_1_client'], 2)} "
                    f"| {r['requests_completed']} | {r['errors']} | {r['rate_limited']} "
                    f"| {_fmt(r['ttft_ms']['p50'])} | {_fmt(r['ttft_ms']['p99'])} "
                    f"| {_fmt(r['itl_ms']['p50'])} | {_fmt(r['itl_ms']['p99'])} |")
    return "\n".join(rows)


async def load_test(server: ServerProcess, args: argparse.Namespace) -> dict:
    results = []
    for clients in args.clients:
        say(f"{clients} client(s): {args.warmup_seconds:g} s warm-up, {args.seconds:g} s measured")
        results.append(await run_phase(server, clients, args))
    single = next((r["tokens_per_second"] for r in results if r["clients"] == 1), None)
    for r in results:
        r["speedup_vs_1_client"] = round(r["tokens_per_second"] / single, 3) if single else None
    print(load_table(results), file=sys.stderr)
    return {"mode": "load", "results": results}


# --- soak mode -----------------------------------------------------------------------------------------------------

async def soak_test(server: ServerProcess, args: argparse.Namespace) -> dict:
    """One client count for --soak-seconds, sampling memory, errors and throughput every --sample-seconds."""
    clients = args.clients[0]
    say(f"soak: {clients} clients for {args.soak_seconds:g} s, a sample every {args.sample_seconds:g} s")
    records: list[RequestRecord] = []
    rss_idle_mb = round(server.rss_bytes() / 2**20, 1)
    samples: list[dict] = []
    async with http_client(server.base_url, clients, args.api_key, args.timeout) as http:
        start = time.perf_counter()
        tasks = [asyncio.create_task(client_loop(http, client, args.prompts, args.max_tokens, records))
                 for client in range(clients)]
        try:
            previous = start
            number = 1
            while previous < start + args.soak_seconds:
                # Sample times are fixed in advance, so a slow sample does not shift the later ones.
                target = min(start + number * args.sample_seconds, start + args.soak_seconds)
                await asyncio.sleep(max(0.0, target - time.perf_counter()))
                now = time.perf_counter()
                if server.exited():
                    raise SystemExit(f"the server exited during the soak:\n{server.log_tail()}")
                figures = interval_figures(records, previous, now)
                so_far = failures(records)
                samples.append({"t_s": round(now - start, 1), "rss_mb": round(server.rss_bytes() / 2**20, 1),
                                "errors": so_far["errors"], "rate_limited": so_far["rate_limited"],
                                "tokens_per_second": figures["tokens_per_second"],
                                "requests_completed": figures["requests_completed"],
                                "ttft_ms_p50": figures["ttft_ms"]["p50"], "itl_ms_p99": figures["itl_ms"]["p99"]})
                say(f"  t={samples[-1]['t_s']:6.1f} s  rss {samples[-1]['rss_mb']:8.1f} MB  "
                    f"{figures['tokens_per_second']:9.1f} tokens/s  errors {so_far['errors']}")
                previous = now
                number += 1
            end = previous
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    overall = interval_figures(records, start, end)
    so_far = failures(records)
    settled = [s for s in samples if s["t_s"] >= args.soak_warmup]
    rss_warm = settled[0]["rss_mb"] if settled else None
    rss_max = max(s["rss_mb"] for s in settled) if settled else None
    rss_last = samples[-1]["rss_mb"] if samples else None

    def growth(value: float | None) -> float | None:
        return round(100 * (value - rss_warm) / rss_warm, 2) if rss_warm and value is not None else None

    flat = rss_warm is not None and growth(rss_max) <= args.rss_tolerance
    result = {
        "mode": "soak", "clients": clients, "soak_seconds": round(end - start, 1),
        "errors": so_far["errors"], "rate_limited": so_far["rate_limited"], "first_errors": so_far["first_errors"],
        "rss_idle_mb": rss_idle_mb, "rss_after_warmup_mb": rss_warm, "rss_max_mb": rss_max, "rss_last_mb": rss_last,
        "rss_growth_percent": growth(rss_last), "rss_max_growth_percent": growth(rss_max),
        "rss_tolerance_percent": args.rss_tolerance, "rss_flat": flat,
        "passed": so_far["errors"] == 0 and flat,
        "overall": overall,
        "samples": samples,
    }
    if rss_warm is None:
        result["note"] = f"no sample at or after --soak-warmup {args.soak_warmup:g} s: memory growth not judged"
    print(soak_table(result), file=sys.stderr)
    return result


def soak_table(result: dict) -> str:
    rows = ["| t (s) | RSS MB | tokens/s | requests | errors (cumulative) | 429s (cumulative) | TTFT p50 ms | ITL p99 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in result["samples"]:
        rows.append(f"| {s['t_s']:g} | {s['rss_mb']:,.1f} | {_fmt(s['tokens_per_second'])} | {s['requests_completed']} "
                    f"| {s['errors']} | {s['rate_limited']} | {_fmt(s['ttft_ms_p50'])} | {_fmt(s['itl_ms_p99'])} |")
    rows.append("")
    rows.append(f"errors {result['errors']}; RSS after warm-up {_fmt(result['rss_after_warmup_mb'])} MB, "
                f"max {_fmt(result['rss_max_mb'])} MB ({_fmt(result['rss_max_growth_percent'], 2)} %), "
                f"last {_fmt(result['rss_last_mb'])} MB ({_fmt(result['rss_growth_percent'], 2)} %); "
                f"{'PASS' if result['passed'] else 'FAIL'} (0 errors, RSS flat within {result['rss_tolerance_percent']:g} %)")
    return "\n".join(rows)


# --- the command ---------------------------------------------------------------------------------------------------

def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="what `scratchgpt serve --checkpoint` loads")
    parser.add_argument("--clients", type=int, nargs="+",
                        help="concurrent clients, one phase each (default 1 4 16 32; 16 with --soak-seconds)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window per client count (default 30)")
    parser.add_argument("--warmup-seconds", type=float, default=5.0, help="unmeasured load before each window (default 5)")
    parser.add_argument("--max-tokens", type=int, default=200, help="max_tokens of every request (default 200)")
    parser.add_argument("--prompt", dest="prompts", action="append",
                        help=f"a prompt, repeatable; the clients take them in turn (default {' / '.join(PROMPTS)})")
    parser.add_argument("--port", type=int, help="the server's port (default: a free one)")
    parser.add_argument("--server-args", default="", help='more arguments for `scratchgpt serve`, e.g. "--device cpu --threads 1"')
    parser.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    parser.add_argument("--server-log", help="keep the server's output in this file (default: a temporary file, deleted)")
    parser.add_argument("--timeout", type=float, default=300.0, help="longest wait for the next byte of an answer (default 300 s)")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="longest wait for /health at start (default 180 s)")
    parser.add_argument("--soak-seconds", type=float, help="soak mode: run one client count this long, sampling memory")
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="soak: seconds between samples (default 10)")
    parser.add_argument("--soak-warmup", type=float, default=60.0,
                        help="soak: memory is judged from the first sample at or after this (default 60 s)")
    parser.add_argument("--rss-tolerance", type=float, default=10.0, help="soak: allowed RSS growth in %% (default 10)")
    args = parser.parse_args(argv)
    args.prompts = args.prompts or PROMPTS
    if args.clients is None:
        args.clients = [16] if args.soak_seconds else [1, 4, 16, 32]
    if args.soak_seconds and len(args.clients) != 1:
        parser.error("--soak-seconds takes one --clients count")
    if any(c < 1 for c in args.clients) or args.max_tokens < 1:
        parser.error("--clients and --max-tokens must be >= 1")
    if args.seconds <= 0 or args.warmup_seconds < 0 or args.sample_seconds <= 0:
        parser.error("--seconds and --sample-seconds must be > 0, --warmup-seconds >= 0")
    return args


async def run(args: argparse.Namespace, server: ServerProcess) -> dict:
    health = await server.wait_healthy(args.api_key, args.startup_timeout)
    await preflight(server, args.prompts, args.api_key, args.timeout)
    result = await (soak_test(server, args) if args.soak_seconds else load_test(server, args))
    return {"health": {key: health.get(key) for key in ("model", "parameters", "config", "vocab_size")}, **result}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    port = args.port or free_port()
    with tempfile.TemporaryDirectory(prefix="bench_serve-") as tmp:
        log_path = Path(args.server_log) if args.server_log else Path(tmp) / "server.log"
        server = ServerProcess(args.checkpoint, port, shlex.split(args.server_args), log_path)
        say(f"started: {shlex.join(server.command)} (pid {server.process.pid})")
        try:
            result = asyncio.run(run(args, server))
        finally:
            stopped = server.stop()
            say(f"server stopped: {stopped}")
    report = {
        "benchmark": "bench_serve", "checkpoint": args.checkpoint, "server_command": shlex.join(server.command),
        "server_stopped_by": stopped,
        "max_tokens": args.max_tokens, "temperature": TEMPERATURE, "prompts": args.prompts,
        "seconds": args.seconds, "warmup_seconds": args.warmup_seconds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        **result,
    }
    if args.soak_seconds:
        report.pop("seconds")
        report.pop("warmup_seconds")
    print(json.dumps(report, indent=2))
    return 0 if result.get("passed", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
