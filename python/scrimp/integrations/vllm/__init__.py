"""KV Packet inside vLLM: an out-of-tree V1 KV connector plus the request convention.

* :mod:`scrimp.integrations.vllm.requests` - how a request marks its documents (no vLLM import):
  :func:`packet_request` builds the prompt token ids and ``kv_transfer_params`` for a
  :class:`~scrimp.packets.Prompt`; :func:`document_spans` checks them.
* :mod:`scrimp.integrations.vllm.connector` - ``ScrimpPacketConnector``, loaded by vLLM through
  ``kv_connector_module_path="scrimp.integrations.vllm.connector"``.
* :mod:`scrimp.integrations.vllm.worker` - the worker half's job: packets from the store (built on a
  miss), placed back to back and written into vLLM's paged cache through the backend's own cache write.
"""
from .requests import PARAMS_KEY, document_spans, packet_request

__all__ = ["PARAMS_KEY", "document_spans", "packet_request"]
