"""TIP rollouts from a ``vllm.LLM`` colocated in the training process.

:class:`VLLMRollouts` holds one in-process vLLM engine (V1, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``:
the engine core and its single worker live in this process) over a copy of the student's checkpoint.
:meth:`~VLLMRollouts.generate` samples one response per prompt (token ids in, token ids out);
:meth:`~VLLMRollouts.sync` loads the student's current weights into the engine's model in place
(``LLM.collective_rpc`` running the worker's ``reload_weights``; no restart) and drops
the prefix cache, whose keys and values came from the old weights.

:class:`scrimp.tip.OnPolicyDistiller` takes it as ``rollout_engine`` (``scrimp tip distill --rollouts
vllm``); the default rollout path stays Hugging Face ``generate``.
"""
from __future__ import annotations

import os
import tempfile
from typing import List, Optional, Sequence

__all__ = ["VLLMRollouts"]


def _load_into_model(worker, weights):
    """Runs on the vLLM worker: the HF-named ``weights`` reloaded in place (``Worker.reload_weights``: the
    model's own loader packs q/k/v and gate/up, then the platform's post-load processing runs again)."""
    worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)


class VLLMRollouts:
    """An in-process ``vllm.LLM`` generating the student's rollouts.

    Parameters
    ----------
    student : the Hugging Face student being trained (``save_pretrained`` gives vLLM its checkpoint).
    tokenizer : the student's tokenizer (saved with the checkpoint).
    max_model_len : the engine's context (prompt + response tokens).
    dtype : vLLM's dtype (default: the student's parameters').
    seed : sampling seed of the engine.
    model_dir : where the checkpoint for vLLM is written (default: a temporary directory).
    llm_kwargs : more ``vllm.LLM`` arguments (``enforce_eager`` is on by default).

    The student's attention heads must be a size vLLM runs on this platform (on CPU: 32, 64, ...);
    others are refused by name (:func:`scrimp.integrations.vllm.openai_server.check_servable`)."""

    def __init__(self, student, tokenizer, *, max_model_len: int = 1024, dtype: Optional[str] = None, seed: int = 0,
                 model_dir: Optional[str] = None, **llm_kwargs):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise ValueError("VLLMRollouts loads the student's weights into the engine in this process: set "
                             "VLLM_ENABLE_V1_MULTIPROCESSING=0")
        import torch
        from vllm import LLM
        from .openai_server import check_servable
        self._tmp = None
        if model_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="scrimp-vllm-rollouts-")
            model_dir = self._tmp.name
        student.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        try:
            check_servable(model_dir, role="student")
        except ValueError as e:
            raise ValueError(str(e).replace(model_dir, "the student") +
                             " (keep the default rollout path: --rollouts generate)") from None
        if dtype is None:
            p = next(student.parameters())
            dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(p.dtype, "auto")
        kw = dict(enforce_eager=True, max_model_len=int(max_model_len), seed=seed, dtype=dtype)
        kw.update(llm_kwargs)
        self.llm = LLM(model=model_dir, tokenizer=model_dir, **kw)
        self.model_dir = model_dir
        self.max_model_len = int(max_model_len)
        self.syncs = 0

    @staticmethod
    def _weights(student):
        """(name, tensor) pairs in Hugging Face naming, detached, contiguous, on the CPU."""
        sd = student.state_dict()
        return [(k, v.detach().contiguous().cpu()) for k, v in sd.items()]

    def sync(self, student) -> None:
        """Load ``student``'s current weights into the engine (in place) and reset its prefix cache."""
        weights = self._weights(student)
        self.llm.collective_rpc(_load_into_model, args=(weights,))
        self.llm.reset_prefix_cache()
        self.syncs += 1

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop_ids: Sequence[int] = (), seed: Optional[int] = None
                 ) -> List[List[int]]:
        """One response (token ids, the stop token included when it ended there) per prompt."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_model_len:
            raise ValueError(f"rollouts: a prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the "
                             f"engine's max_model_len {self.max_model_len}")
        sp = SamplingParams(n=1, max_tokens=int(max_new_tokens), temperature=float(temperature),
                            top_p=float(top_p) if temperature > 0 else 1.0,
                            top_k=int(top_k) if temperature > 0 else 0,
                            stop_token_ids=list(stop_ids), detokenize=False, seed=seed)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
