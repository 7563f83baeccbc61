"""A small OpenAI-compatible completions server around Hugging Face ``generate``.

    python -m scrimp.tessy.server --model PATH|testbed:arith-student --port 8001 [--name NAME]

Endpoints: ``POST /v1/completions`` (``prompt`` a string or a list of strings,
``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``n`` = 1),
``POST /v1/chat/completions`` (rendered with the tokenizer's chat template),
``GET /v1/models``, ``GET /health``. Concurrent requests are batched into one
``generate`` call (the same micro-batcher as the local TESSY backend). Errors use
the OpenAI error shape ``{"error": {"message", "type", "code"}}``.

Built on FastAPI + uvicorn; vLLM or SGLang serve the same API on a GPU.
"""
# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations at runtime

import argparse
import sys
import time
import uuid
from typing import Optional

__all__ = ["create_app", "main"]


def create_app(backend, model_name: Optional[str] = None, max_tokens_limit: int = 4096):
    """A FastAPI app serving ``backend`` (a :class:`~scrimp.tessy.backends.LocalBackend`)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from .backends import GenParams

    name = model_name or backend.name
    app = FastAPI(title="scrimp tessy completions server")
    stats = {"requests": 0, "errors": 0, "started": time.time()}

    def err(status, message, typ="invalid_request_error", code=None):
        stats["errors"] += 1
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": typ, "code": code}})

    def parse_common(body):
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        m = body.get("model")
        if m is not None and m != name:
            raise LookupError(f"model {m!r} is not served here (this server serves {name!r})")
        mt = body.get("max_tokens", 16)
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            raise ValueError("max_tokens must be a positive integer")
        if mt > max_tokens_limit:
            raise ValueError(f"max_tokens {mt} exceeds this server's limit {max_tokens_limit}")
        n = body.get("n", 1)
        if n != 1:
            raise ValueError("only n=1 is supported")
        if body.get("stream"):
            raise ValueError("streaming is not supported")
        try:
            params = GenParams(float(body.get("temperature", 1.0)), float(body.get("top_p", 1.0)),
                               int(body.get("top_k", 0) or 0)).validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad sampling parameters: {e}")
        return mt, params

    async def read_json(request):
        try:
            return await request.json()
        except Exception:
            raise ValueError("the request body is not valid JSON")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "requests": stats["requests"], "errors": stats["errors"]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "scrimp",
                                            "created": int(stats["started"])}]}

    async def _complete(prompts, mt, params):
        import asyncio
        return await asyncio.gather(*[backend.generate(p, mt, params) for p in prompts])

    @app.post("/v1/completions")
    async def completions(request: Request):
        stats["requests"] += 1
        try:
            body = await read_json(request)
            mt, params = parse_common(body)
            prompt = body.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompt must be a string or a non-empty list of strings")
        except LookupError as e:
            return err(404, str(e), code="model_not_found")
        except ValueError as e:
            return err(400, str(e))
        try:
            results = await _complete(prompts, mt, params)
        except Exception as e:  # pragma: no cover - a model failure
            return err(500, f"generation failed: {type(e).__name__}: {e}", typ="server_error")
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                   for i, r in enumerate(results)]
        ntok = sum(r.n_tokens or 0 for r in results)
        return {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": choices,
                "usage": {"completion_tokens": ntok}}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        stats["requests"] += 1
        try:
            body = await read_json(request)
            mt, params = parse_common(body)
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                    for m in msgs):
                raise ValueError("messages must be a non-empty list of {role, content} objects")
            tok = backend.tokenizer
            if not getattr(tok, "chat_template", None):
                raise ValueError("this model has no chat template")
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except LookupError as e:
            return err(404, str(e), code="model_not_found")
        except ValueError as e:
            return err(400, str(e))
        (r,) = await _complete([prompt], mt, params)
        return {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion",
                "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "finish_reason": r.finish_reason}],
                "usage": {"completion_tokens": r.n_tokens or 0}}

    return app


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scrimp.tessy.server",
                                description="OpenAI-compatible completions server around HF generate")
    p.add_argument("--model", required=True, help="model: testbed:NAME, a checkpoint directory or a hub id")
    p.add_argument("--name", default=None, help="model name clients must send (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch", type=int, default=64, help="largest batched generate call")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    from scrimp.models import add_device_dtype_arguments
    add_device_dtype_arguments(p)
    args = p.parse_args(argv)
    import torch
    import uvicorn

    from .backends import LocalBackend
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = LocalBackend.from_pretrained(args.model, name=args.name or args.model, max_batch=args.max_batch,
                                           device=args.device, dtype=args.dtype, decoding="reprefill")
    app = create_app(backend, args.name or args.model)
    print(f"serving {args.name or args.model} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
