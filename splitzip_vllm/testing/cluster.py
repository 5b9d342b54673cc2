"""Launch and drive local vLLM servers (prefill, decode, reference) and the P/D proxy on loopback."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
CONNECTOR_MODULE = "splitzip_vllm.connector"


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range: a port-0 pick from inside that range can be handed to
    another socket (vLLM's, UCX's) before our server binds it ("Address already in use" seen in CI)."""
    import random
    try:
        lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        lo = 32768
    for _ in range(200):
        port = random.randrange(10000, max(10001, lo))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kv_config(connector: str, role: str, policy: str = "fail", extra: dict[str, Any] | None = None) -> dict:
    cfg: dict[str, Any] = {"kv_connector": connector, "kv_role": role, "kv_load_failure_policy": policy}
    if connector == "SplitZipConnector":
        cfg["kv_connector_module_path"] = CONNECTOR_MODULE
    else:
        cfg["kv_buffer_device"] = "cpu"
    if extra:
        cfg["kv_connector_extra_config"] = extra
    return cfg


@dataclass
class Server:
    """One ``vllm.entrypoints.openai.api_server`` process."""
    name: str
    model: str
    log_dir: Path
    kv: dict | None = None
    cpu_bind: str = "0"
    port: int = field(default_factory=free_port)
    side_port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    max_model_len: int = 4096
    host: str = "127.0.0.1"                                  # --host and the address in ``url``
    prefix: list[str] = field(default_factory=list)          # e.g. ["ip", "netns", "exec", "ns1"]
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> "Server":
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   VLLM_CPU_OMP_THREADS_BIND=self.cpu_bind, VLLM_NIXL_SIDE_CHANNEL_PORT=str(self.side_port),
                   VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1", PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.update(self.env)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--served-model-name", "tiny", "--dtype", "bfloat16", "--max-model-len", str(self.max_model_len),
               "--enforce-eager", "--port", str(self.port), "--host", self.host, *self.args]
        if self.kv is not None:
            cmd += ["--kv-transfer-config", json.dumps(self.kv)]
        cmd = [*self.prefix, *cmd]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.name} not healthy after {timeout}s; log tail:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def histogram(self, name: str) -> dict[float, float]:
        """Cumulative bucket counts ``{le: count}`` of a Prometheus histogram, summed over its other labels."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out: dict[float, float] = {}
        for line in text.splitlines():
            if line.startswith(f"{name}_bucket{{"):
                labels, _, value = line.rpartition(" ")
                le = float(labels.split('le="')[1].split('"')[0])
                out[le] = out.get(le, 0.0) + float(value)
        return out

    def metrics(self) -> dict[str, float]:
        """Prometheus samples summed over labels except ``source`` (kept as ``name{source}``)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{")[0]
            if "source=" in name_labels:
                src = name_labels.split('source="')[1].split('"')[0]
                name = f"{name}{{{src}}}"
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                pass
        return out


@dataclass
class Proxy:
    prefill: list[str]
    decode: list[str]
    log_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    side_channels: list[str] = field(default_factory=list)   # "host:port" per prefill: layer-wise mode

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Proxy":
        def split(urls: list[str]) -> tuple[list[str], list[str]]:
            hp = [u.removeprefix("http://").split(":") for u in urls]
            return [h for h, _ in hp], [p for _, p in hp]
        ph, pp = split(self.prefill)
        dh, dp = split(self.decode)
        cmd = [sys.executable, str(REPO / "examples" / "proxy.py"), "--port", str(self.port),
               "--prefiller-hosts", *ph, "--prefiller-ports", *pp, "--decoder-hosts", *dh, "--decoder-ports", *dp]
        if self.side_channels:
            cmd += ["--transfer", "layerwise", "--prefiller-side-channels", *self.side_channels]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_dir / "proxy.log", "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthcheck", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.5)
        raise TimeoutError("proxy did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)


def completion_body(prompt: list[int] | str, max_tokens: int = 24) -> dict[str, Any]:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}


def complete(url: str, body: dict[str, Any], timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


def token_ids(resp: httpx.Response) -> list[int]:
    resp.raise_for_status()
    return list(resp.json()["choices"][0]["token_ids"])


def prefill_then_decode(prefill_url: str, decode_url: str, body: dict[str, Any],
                        timeout: float = 300) -> tuple[dict[str, Any], httpx.Response]:
    """The proxy protocol done by hand: returns (prefill kv_transfer_params, decode response)."""
    p = httpx.post(f"{prefill_url}/v1/completions",
                   json=dict(body, max_tokens=1, kv_transfer_params={"do_remote_decode": True}), timeout=timeout)
    p.raise_for_status()
    params = p.json()["kv_transfer_params"]
    d = httpx.post(f"{decode_url}/v1/completions", json=dict(body, kv_transfer_params=params), timeout=timeout)
    return params, d


def make_prompts(lengths: list[int], vocab: int = 4096, seed: int = 0) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
