"""The KV Packet method on Hugging Face models, in one namespace (``scrimp.packets.method``).

Packet of a document = the KV cache of ``[header, document, trailer]`` prefilled alone from position 0
(header / trailer: trained soft embeddings shared by all documents). Inference fetches the packets,
re-rotates them to their new offsets in one fused pass (:func:`scrimp.packets.assemble`), prefills
only the question and decodes. Each job has its own module; this one re-exports them:

* :mod:`~scrimp.packets.model_io` - fingerprints, the forward call, embeddings, KV layout, token checks;
* :mod:`~scrimp.packets.adapter` - :class:`Adapters` (the header / trailer soft tokens);
* :mod:`~scrimp.packets.build` - building (and pruning) packets, where a prompt's packets go;
* :mod:`~scrimp.packets.engine` - :class:`PacketEngine`, the transformers inference engine;
* :mod:`~scrimp.packets.baselines` - full recompute and CacheBlend-style selective recompute;
* :mod:`~scrimp.packets.flops` - FLOP accounting.
"""
from __future__ import annotations

from .adapter import ADAPTER_FORMAT, HEADER_KV, Adapters
from .baselines import (SelectiveRecompute, _kv_deviation, _plain_ids, _recompute_positions, full_answer,
                        full_first_token_logits, layer_kv_full_attention)
from .build import (_new_cache, _prefill_embeds, _wrapped_prefill, build_packet_kv, build_pruned_packet_kv,
                    drop_header, packet_positions)
from .engine import (PACKET_POSITIONS, REFUSED_FEATURES, Answer, PacketEngine, _greedy_from, _question_logits,
                     check_model, stop_ids, token_id_list)
from .flops import flops_prefill, flops_rerotation, method_flops
from .prompt import Prompt, build_prompt
from .rope import assemble, rerotate_keys, rope_inv_freq, rope_spec, verify_rerotation
from .store import PacketStore, _layers_of
from .model_io import (_cache_kw, _device, _embed, _forward, _kv_layout, _out_cache, _wrong_model_message,
                       check_token_ids, model_dtype_name, model_fingerprint, model_fingerprint_any_dtype, vocab_size)

__all__ = ["model_fingerprint", "Adapters", "packet_positions", "build_packet_kv", "build_pruned_packet_kv",
           "PacketEngine", "PACKET_POSITIONS", "Answer", "SelectiveRecompute", "full_answer",
           "full_first_token_logits", "check_model", "REFUSED_FEATURES", "stop_ids", "layer_kv_full_attention",
           "drop_header", "HEADER_KV", "flops_prefill", "flops_rerotation", "method_flops"]
