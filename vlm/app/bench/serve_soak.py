"""``vlm bench serve``: a soak of ``vlm serve`` with concurrent clients and a share of bad requests."""

from __future__ import annotations

import base64
import io
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from vlm.app.env import environment
from vlm.core.errors import ConfigError


def _png_data_uri(size: int = 32, seed: int = 0) -> str:
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat(image: str, question: str, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": question}]}],
            "max_tokens": max_tokens}


# each bad request: (name, json body or raw bytes); every one must be answered with a 4xx
def _bad_requests(image: str) -> List[Tuple[str, object]]:
    not_an_image = "data:image/png;base64," + base64.b64encode(b"this is not a png").decode()
    return [
        ("malformed_json", b'{"messages": [ {"role": "user", "content": '),
        ("no_messages", {"max_tokens": 4}),
        ("negative_max_tokens", _chat(image, "what shape?", -5)),
        ("not_an_image", _chat(not_an_image, "what shape?", 4)),
        ("remote_url", _chat("http://example.com/cat.png", "what shape?", 4)),
        ("over_the_context", _chat(image, "shape " * 20000, 4)),
        ("unknown_role", {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 4}),
    ]


@dataclass
class Outcome:
    """One request's kind (``good`` or the bad case's name), HTTP status and seconds."""

    kind: str
    status: int
    seconds: float


def _rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` and its children."""
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vlm serve exited with {server.returncode} before answering")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"vlm serve did not answer {url}/health within {timeout:.0f} s")


def _percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def soak_serve(checkpoint: str, requests: int = 2000, clients: int = 50, bad_ratio: float = 0.1,
               max_tokens: int = 8, warm_requests: int = 100, seed: int = 0,
               serve_args: Tuple[str, ...] = (), progress: bool = True) -> Dict:
    """Start ``vlm serve CHECKPOINT`` on a loopback port, send ``requests`` chat requests from
    ``clients`` concurrent clients, a ``bad_ratio`` share of them bad (malformed, refused
    values, not an image, a remote URL, over the context ...), and measure: statuses by kind,
    requests/s, latency p50 / p99 of the good ones, the server's resident memory after the first
    ``warm_requests`` and at the end. The server is stopped with SIGTERM (its drain) at the end."""
    import httpx
    from tqdm import tqdm

    if not Path(checkpoint).is_dir():
        raise ConfigError(f"checkpoint {checkpoint}: no such folder")
    if requests < warm_requests or clients < 1 or not 0 <= bad_ratio < 1:
        raise ConfigError("--requests must be >= --warm-requests, --clients >= 1, --bad-ratio in [0, 1)")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "vlm", "serve", str(checkpoint), "--port", str(port),
                               "--max-queue", str(max(64, 2 * clients)), *serve_args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rng = random.Random(seed)
    image = _png_data_uri(seed=seed)
    bad = _bad_requests(image)
    # round(requests x bad_ratio) bad requests at random places, their kinds taken in turn
    bad_at = sorted(rng.sample(range(requests), round(requests * bad_ratio)))
    plan = [("good", _chat(image, "what shape is it?", max_tokens))] * requests
    for i, at in enumerate(bad_at):
        plan[at] = bad[i % len(bad)]
    outcomes: List[Outcome] = []
    memory: Dict[str, int] = {}
    try:
        _wait_until_up(url, server)
        with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
            def send(item) -> Outcome:
                kind, body = item
                start = time.perf_counter()
                if isinstance(body, bytes):
                    response = http.post(url + "/v1/chat/completions", content=body,
                                         headers={"Content-Type": "application/json"})
                else:
                    response = http.post(url + "/v1/chat/completions", json=body)
                return Outcome(kind, response.status_code, time.perf_counter() - start)

            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool, tqdm(total=requests, desc="soak", disable=not progress) as bar:
                for outcome in pool.map(send, plan):
                    outcomes.append(outcome)
                    bar.update()
                    if len(outcomes) == warm_requests:
                        memory["after_warm_rss_mb"] = _rss_bytes(server.pid) / 2**20
            elapsed = time.perf_counter() - start
        memory["end_rss_mb"] = _rss_bytes(server.pid) / 2**20
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    good = [o for o in outcomes if o.kind == "good"]
    statuses: Dict[str, Dict[str, int]] = {}
    for o in outcomes:
        by_status = statuses.setdefault(o.kind, {})
        by_status[str(o.status)] = by_status.get(str(o.status), 0) + 1
    latencies = [o.seconds for o in good]
    return {
        "requests": requests, "clients": clients, "bad_ratio": bad_ratio, "max_tokens": max_tokens,
        "seconds": elapsed, "requests_per_s": requests / elapsed,
        "good": len(good), "good_answered": sum(o.status == 200 for o in good),
        "bad": len(outcomes) - len(good), "bad_4xx": sum(400 <= o.status < 500 for o in outcomes if o.kind != "good"),
        "statuses": statuses,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": _percentile(latencies, 0.99) if latencies else None,
        **memory,
        "rss_growth": memory["end_rss_mb"] / memory["after_warm_rss_mb"] - 1,
        "server_exit_code": server.returncode,
        "environment": environment(),
    }
