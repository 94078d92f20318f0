"""Host-side state for jitted code: objects in host memory named by int32 handles.

Jitted code cannot hold a Python object, and a Python callable passed as a static argument makes
a new compilation per callable. So host state (a token-stream callback, a KV store and its
index) is registered here and named by an int32 *handle* that travels through jit as an
ordinary traced value; a host callback receives the handle and looks the object up. Nothing
here imports the model or the methods.

``host_offload.host_call``: host calls from jitted code through an XLA FFI handler
(``io_callback`` where it cannot serve); ``host_offload.index``: maximum-inner-product indexes
(exact, faiss IVF and HNSW, and an attention-aware IVF trained on prefill queries);
``host_offload.store``: the host KV of a retrieval-attention request behind them.
"""

from host_offload.handles import lookup, registered, release, register

__all__ = ["lookup", "register", "registered", "release"]
