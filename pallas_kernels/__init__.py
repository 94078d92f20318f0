"""Attention kernels for the policies, each returning ``(out, lse)`` so parts merge exactly.

Every op takes ``impl``: ``"auto"`` (GPU kernel where one exists, else the jnp reference),
``"pallas"``, ``"interpret"`` (the Pallas kernel interpreted on CPU, for tests) or
``"reference"``. All are GQA-aware (query head ``h`` reads KV head ``h // (Hq // Hkv)``),
accumulate in float32 and return ``lse`` in float32.
"""

from pallas_kernels._common import IMPLS, masked_attention
from pallas_kernels.band_prefill import band_prefill_attention
from pallas_kernels.decode import decode_attention
from pallas_kernels.merge import merge_attention
from pallas_kernels.topk import topk_decode_attention
from pallas_kernels.window import window_decode_attention

__all__ = ["IMPLS", "band_prefill_attention", "decode_attention", "masked_attention",
           "merge_attention", "topk_decode_attention", "window_decode_attention"]
