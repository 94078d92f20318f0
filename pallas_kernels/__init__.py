"""Attention kernels for the policies, each returning ``(out, lse)`` so parts merge exactly.

Every op takes ``impl``: ``"auto"`` (the Pallas GPU kernel on a GPU backend, else the jnp
reference), ``"pallas"``, ``"interpret"`` (the same Pallas kernel run by the Pallas interpreter,
for CPU tests) or ``"reference"``. All are GQA-aware (query head ``h`` reads KV head
``h // (Hq // Hkv)``), take bf16 or float32, accumulate in float32 and return ``lse`` (natural
log of the softmax denominator over the visible keys) in float32; no visible key gives
``out = 0`` and ``lse = -inf``. ``decode_scores`` returns per-key scores instead, for KV
selection; ``decode_attention``/``decode_append_attention`` with ``with_scores=True`` return
them too, from logits stored while streaming the cache (no second read of K).
Full prefill's chunk-over-cache attention has two more: ``hopper_prefill_attention`` (a Mosaic
GPU kernel for Hopper, one pass; ``hopper_problem`` says why it cannot run, ``None`` when it can)
and ``prefix_prefill_attention`` (cuDNN, two masked calls merged by lse; ``cudnn_problem``);
``Tiles`` tunes the band kernel. ``pallas_kernels.allreduce`` is not attention: a one-shot NVLink
sum for the row-parallel products of a model split over a mesh (``sharding.row_parallel``).
``default_impl(impl)`` is a context under which ``"auto"`` means ``impl``. See README.md beside
this file for the contracts and timings.
"""

from pallas_kernels._common import IMPLS, default_impl, masked_attention, query_heads, ring_slot
from pallas_kernels.band_blockwise import band_attention_blockwise  # noqa: F401  (training)
from pallas_kernels.band_prefill import Tiles, band_prefill_attention
from pallas_kernels.decode import decode_append_attention, decode_attention
from pallas_kernels.duo_decode import duo_decode_attention
from pallas_kernels.hopper_prefill import hopper_prefill_attention, hopper_problem
from pallas_kernels.merge import merge_attention
from pallas_kernels.prefix_prefill import cudnn_problem, prefix_prefill_attention
from pallas_kernels.scores import decode_scores
from pallas_kernels.select import top_k_unsorted
from pallas_kernels.topk import topk_decode_attention
from pallas_kernels.window import window_decode_attention

__all__ = ["IMPLS", "Tiles", "band_attention_blockwise", "band_prefill_attention", "cudnn_problem",
           "decode_append_attention", "decode_attention", "decode_scores", "default_impl",
           "duo_decode_attention", "hopper_prefill_attention", "hopper_problem",
           "masked_attention", "merge_attention",
           "prefix_prefill_attention", "query_heads", "ring_slot", "top_k_unsorted",
           "topk_decode_attention", "window_decode_attention"]
