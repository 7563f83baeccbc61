"""A vLLM OpenAI-server middleware that answers malformed document spans with HTTP 400.

    python -m vllm.entrypoints.openai.api_server ... --middleware scrimp.integrations.vllm.server.check_document_spans

The connector's scheduler half cannot fail a request (it serves a request with bad spans without packets
and logs a warning); this check runs in the API server first, so a client learns which field is wrong.
It knows the prompt length only when the prompt is a token list, and not the adapters' token counts: the
scheduler half re-checks the spans with both.
"""
from __future__ import annotations

import json

from .requests import PARAMS_KEY, document_spans

__all__ = ["check_document_spans"]

_PATHS = ("/v1/completions", "/v1/chat/completions")


def _problem(body: bytes):
    """The error message for a request body whose document spans are malformed, else None."""
    try:
        req = json.loads(body or b"{}")
    except ValueError:
        return None  # not JSON: vLLM's own validation answers
    if not isinstance(req, dict) or "kv_transfer_params" not in req:
        return None
    params = req["kv_transfer_params"]
    prompt = req.get("prompt")
    n_prompt = len(prompt) if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) else 1 << 62
    try:
        document_spans(params, n_prompt, 0, 0)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


async def check_document_spans(request, call_next):
    """HTTP middleware: 400 naming the field when ``kv_transfer_params.scrimp_documents`` is malformed."""
    if request.method == "POST" and request.url.path in _PATHS:
        body = await request.body()
        if PARAMS_KEY.encode() in body:
            problem = _problem(body)
            if problem is not None:
                from fastapi.responses import JSONResponse

                return JSONResponse(status_code=400, content={"error": {
                    "message": problem, "type": "BadRequestError", "param": f"kv_transfer_params.{PARAMS_KEY}",
                    "code": 400}})
    return await call_next(request)
