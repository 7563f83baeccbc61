"""A vLLM OpenAI-compatible server as a managed subprocess, for TESSY's remote backend.

:class:`VLLMServer` starts ``python -m vllm.entrypoints.openai.api_server`` for one model on a
loopback port, waits (bounded) for ``/health`` and stops the server and its engine process in every
case (a context manager; ``stop`` terminates the process group, then kills it).
:func:`check_servable` refuses by name a model vLLM cannot run on this platform (on CPU: attention
head sizes outside the CPU attention backend's list), pointing to the in-process backend instead.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Optional, Sequence

__all__ = ["VLLMServer", "check_servable", "cpu_head_sizes", "free_port", "IN_PROCESS_HINT"]

#: the CPU attention backend's head sizes in vLLM 0.32 (read from vLLM itself when importable)
_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

IN_PROCESS_HINT = ("run this model in process instead: `scrimp tessy synth --{role} SPEC` without "
                   "`--{role}-url` (LocalBackend), or `scrimp tip distill` without `--rollouts vllm`")


def cpu_head_sizes() -> tuple:
    """Head sizes vLLM's CPU attention backend runs (``CPUAttentionBackend.get_supported_head_sizes``)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        return tuple(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # vLLM missing or laid out differently: the 0.32 list
        return _CPU_HEAD_SIZES


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform
        return current_platform.is_cpu()
    except Exception:
        return True


def check_servable(model: str, role: str = "model", cpu: Optional[bool] = None) -> str:
    """The checkpoint directory of ``model`` (``testbed:NAME``, a directory or a hub id) when vLLM can
    serve it here; ValueError naming the reason and the in-process path otherwise. ``cpu``: check for
    vLLM's CPU backend (default: when vLLM's platform is the CPU)."""
    from scrimp.models import resolve_model_spec
    path = resolve_model_spec(model)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        return path  # a hub id: vLLM reads it itself
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
    if (_on_cpu() if cpu is None else cpu) and head_dim is not None:
        sizes = cpu_head_sizes()
        if head_dim not in sizes:
            hint = IN_PROCESS_HINT.format(role=role if role in ("teacher", "student") else "student")
            raise ValueError(
                f"vLLM cannot serve {model} on this CPU: its attention heads have {head_dim} dims and vLLM's CPU "
                f"attention backend runs head sizes {', '.join(map(str, sizes))} only; {hint}")
    return path


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` for ``model`` served as ``name``.

    ``max_model_len``, ``dtype`` and ``enforce_eager`` are passed on; ``extra_args`` are appended.
    On CPU the environment gets ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB) and ``VLLM_CPU_OMP_THREADS_BIND=nobind``
    unless set. ``python``: the interpreter with vLLM installed. The server's output goes to
    ``log_path`` (a temporary file by default); a server that exits or is not healthy within
    ``startup_timeout`` seconds raises RuntimeError with the reason found in its log."""

    def __init__(self, model: str, name: str, port: Optional[int] = None, host: str = "127.0.0.1",
                 max_model_len: Optional[int] = 512, dtype: str = "float32", enforce_eager: bool = True,
                 extra_args: Sequence[str] = (), env: Optional[dict] = None, python: Optional[str] = None,
                 startup_timeout: float = 300.0, log_path: Optional[str] = None, check: bool = True,
                 role: str = "model"):
        self.model, self.name, self.host = model, name, host
        self.port = port or free_port()
        self.max_model_len, self.dtype, self.enforce_eager = max_model_len, dtype, enforce_eager
        self.extra_args = list(extra_args)
        self.env = env
        self.python = python or sys.executable
        self.startup_timeout = float(startup_timeout)
        self.log_path = log_path
        self.check = check
        self.role = role
        self.proc: Optional[subprocess.Popen] = None
        self.startup_s: Optional[float] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list:
        from scrimp.models import resolve_model_spec
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model_spec(self.model),
               "--served-model-name", self.name, "--dtype", self.dtype, "--host", self.host, "--port", str(self.port)]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        return cmd + self.extra_args

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, chars: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-chars:]
        except (OSError, TypeError):
            return ""

    def _reason(self) -> str:
        """The most telling lines of the server's log: errors, the last lines otherwise."""
        lines = [ln.strip() for ln in self.log_tail(200_000).splitlines() if ln.strip()]
        keys = ("Error:", "error:", "not supported", "Unsupported", "head size", "head_dim")
        picked = [ln for ln in lines if any(k in ln for k in keys) and not ln.startswith("File ")]
        return " | ".join((picked or lines)[-4:])[-1500:]

    def _warm_up(self) -> None:
        """One 1-token completion: vLLM reports healthy before its engine has run the model once, and a
        model its kernels refuse (e.g. an unsupported attention head size) fails only at the first request."""
        body = json.dumps({"model": self.name, "prompt": "a", "max_tokens": 1, "temperature": 0}).encode()
        req = urllib.request.Request(self.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.startup_timeout) as r:
                if r.status == 200:
                    return
                err = f"HTTP {r.status}"
        except OSError as e:
            err = f"{type(e).__name__}: {e}"
        time.sleep(1.0)  # let the engine write its error
        reason = self._reason()
        hint = ""
        if "head_dim" in reason or "head size" in reason.lower():
            hint = "; " + IN_PROCESS_HINT.format(role=self.role if self.role in ("teacher", "student") else "student")
        raise RuntimeError(f"the vLLM server for {self.model} came up but failed its first 1-token completion "
                           f"({err}): {reason}{hint} (log: {self.log_path})")

    def start(self) -> "VLLMServer":
        if self.check:
            check_servable(self.model, self.role)
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix=f"vllm-{self.name}-", suffix=".log")
            os.close(fd)
        t0 = time.time()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            while True:
                if self.proc.poll() is not None:
                    reason = self._reason()
                    hint = ""
                    if "head size" in reason.lower() or "head_size" in reason.lower():
                        hint = "; " + IN_PROCESS_HINT.format(
                            role=self.role if self.role in ("teacher", "student") else "student")
                    raise RuntimeError(f"the vLLM server for {self.model} exited with code {self.proc.returncode} "
                                       f"while starting: {reason}{hint} (log: {self.log_path})")
                if self._healthy():
                    self._warm_up()
                    self.startup_s = time.time() - t0
                    return self
                if time.time() - t0 > self.startup_timeout:
                    raise RuntimeError(f"the vLLM server for {self.model} was not healthy at {self.url}/health after "
                                       f"{self.startup_timeout:.0f} s: {self._reason()} (log: {self.log_path})")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate the server's process group (API server and engine core), then kill what is left."""
        p, self.proc = self.proc, None
        if p is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived the leader
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
