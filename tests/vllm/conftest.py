"""Shared set-up of the vLLM integration tests (run in the vLLM environment tests/run.sh builds).

vLLM's CPU build needs a KV cache size and must not pin OpenMP threads on a shared CI machine."""
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

import sys

# the random-weight model and tokenizer builders of the main suite (tests/python/hf_models.py)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
