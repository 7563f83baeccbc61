"""``ScrimpPacketConnector``: KV Packet as an out-of-tree vLLM V1 KV connector.

    --kv-transfer-config '{"kv_connector": "ScrimpPacketConnector",
                           "kv_connector_module_path": "scrimp.integrations.vllm.connector",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"adapters": "adapters.safetensors",
                               "store_path": "/var/cache/scrimp", "host_bytes": 1073741824}}'

vLLM runs two instances that share nothing: the scheduler half (engine core) and the worker half (each
worker process). The scheduler half reads a request's document spans
(:mod:`scrimp.integrations.vllm.requests`) and tells vLLM that the tokens from its local prefix-cache hit
to the end of the last document are supplied externally; vLLM then computes only the rest (the question).
It never asks the store: the worker half always supplies those rows, taking each packet from the store
or building it on a miss, so no eviction between the two decisions can make them disagree. A load that
fails (corrupt packet, store error, build error) reports its blocks as failed and vLLM recomputes them
(``kv_load_failure_policy="recompute"``, required): failed rows are never attended to.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                              KVConnectorRole)

from ...packets.adapter import Adapters
from .requests import document_spans
from .worker import LoadSpec, PacketWriter

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

__all__ = ["ScrimpPacketConnector", "ScrimpPacketMetadata"]

log = logging.getLogger("scrimp.vllm")

#: kv_connector_extra_config keys and their meaning
EXTRA_CONFIG = {
    "adapters": "path of the KV Packet adapter file (safetensors) trained for the served model (required)",
    "store_path": "directory of the packet store's disk tier (shared by workers and restarts); none: host tier only",
    "host_bytes": "capacity of the store's host tier in bytes (default 1 GiB)",
    "disk_bytes": "capacity of the disk tier in bytes (default 16 GiB when store_path is given)",
}


@dataclass
class ScrimpPacketMetadata(KVConnectorMetadata):
    """What the scheduler half hands the worker half each step: the loads to do before the forward."""
    loads: List[LoadSpec] = field(default_factory=list)


def _extra(config: "VllmConfig") -> Dict[str, Any]:
    extra = dict(config.kv_transfer_config.kv_connector_extra_config or {})
    unknown = sorted(set(extra) - set(EXTRA_CONFIG))
    if unknown:
        raise ValueError(f"ScrimpPacketConnector: unknown kv_connector_extra_config keys {unknown}; "
                         f"known: {sorted(EXTRA_CONFIG)}")
    if not isinstance(extra.get("adapters"), str):
        raise ValueError("ScrimpPacketConnector: kv_connector_extra_config needs \"adapters\": the path of the "
                         "KV Packet adapter file trained for the served model")
    for k in ("host_bytes", "disk_bytes"):
        v = extra.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"ScrimpPacketConnector: kv_connector_extra_config.{k} must be an int >= 0, got {v!r}")
    if config.kv_transfer_config.kv_load_failure_policy != "recompute":
        raise ValueError("ScrimpPacketConnector needs kv_load_failure_policy=\"recompute\" in the "
                         "kv-transfer-config (a packet that fails to load is then recomputed by vLLM), got "
                         f"{config.kv_transfer_config.kv_load_failure_policy!r}")
    return extra


class ScrimpPacketConnector(KVConnectorBase_V1):
    """KV Packet documents in vLLM's paged cache: built once, reused at any position of any request."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = _extra(vllm_config)
        self._block_size = vllm_config.cache_config.block_size
        if role == KVConnectorRole.SCHEDULER:
            adapters = Adapters.load(extra["adapters"])
            self._n_header, self._n_trailer = adapters.n_header, adapters.n_trailer
            # request id -> (local prefix-cache hit, external tokens, spans) until its load is scheduled
            self._planned: Dict[str, Tuple[int, int, List[Tuple[int, int]]]] = {}
            self._to_load: Dict[str, "Request"] = {}
            self._loaded_tokens: Dict[str, int] = {}
        else:
            mc = vllm_config.model_config
            self._writer = PacketWriter(mc.model, extra["adapters"], dtype=mc.dtype,
                                        device=str(vllm_config.device_config.device),
                                        store_path=extra.get("store_path"),
                                        host_bytes=extra.get("host_bytes", 1 << 30),
                                        disk_bytes=extra.get("disk_bytes"))
            self._failed_blocks: set = set()

    # ------------------------------------------------------------------ scheduler half

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> Tuple[Optional[int], bool]:
        prompt = list(request.prompt_token_ids or [])
        try:
            spans = document_spans(request.kv_transfer_params, len(prompt), self._n_header, self._n_trailer)
        except (TypeError, ValueError) as e:
            log.warning("request %s: %s; served without packets", request.request_id, e)
            return 0, False
        if not spans:
            return 0, False
        n = spans[-1][1] - num_computed_tokens
        if n <= 0:
            return 0, False
        self._planned[request.request_id] = (num_computed_tokens, n, spans)
        return n, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if num_external_tokens > 0 and request.request_id in self._planned:
            self._to_load[request.request_id] = request

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = ScrimpPacketMetadata()
        blocks_of: Dict[str, List[int]] = {}
        for new in scheduler_output.scheduled_new_reqs:
            blocks_of[new.req_id] = list(new.block_ids[0])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id in cached.resumed_req_ids and cached.new_block_ids[i] is not None:
                blocks_of[req_id] = list(cached.new_block_ids[i][0])  # all blocks of a resumed request
        for req_id in list(self._to_load):
            if req_id not in blocks_of:
                continue
            request = self._to_load.pop(req_id)
            start, n, spans = self._planned.pop(req_id)
            end = start + n
            meta.loads.append(LoadSpec(req_id, list(request.prompt_token_ids[:end]), spans, start, end,
                                       blocks_of[req_id]))
            self._loaded_tokens[req_id] = n
        return meta

    def request_finished(self, request: "Request", block_ids: List[int]) -> Tuple[bool, Optional[Dict[str, Any]]]:
        self._planned.pop(request.request_id, None)
        self._to_load.pop(request.request_id, None)
        n = self._loaded_tokens.pop(request.request_id, None)
        return False, ({"scrimp_packet_tokens": n} if n is not None else None)

    # ------------------------------------------------------------------ worker half

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, ScrimpPacketMetadata) or not meta.loads:
            return
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        for spec in meta.loads:
            try:
                self._writer.write(spec, forward_context.no_compile_layers, self._block_size, rank, size)
            except Exception as e:  # any failure: vLLM recomputes these rows, never reads them
                first = spec.start // self._block_size
                last = -(-spec.end // self._block_size)
                self._failed_blocks.update(spec.block_ids[first:last])
                log.warning("request %s: loading its packets failed (%s: %s); rows %d-%d are recomputed",
                            spec.req_id, type(e).__name__, e, spec.start, spec.end)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous: done in start_load_kv before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # packets are built from the documents alone, never saved from a request's KV

    def wait_for_save(self):
        return

    def get_block_ids_with_load_errors(self) -> set:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed
