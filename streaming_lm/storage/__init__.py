"""Cache storage: how keys and values are held, named after transformers' ``cache_utils``.

- ``EvictingDynamicCache``: grows while a stream is read, then trims to the policy's ``held`` set
  after every pass (the token loop and the chunked path);
- ``EvictingStaticCache``: preallocated slots for one-token decode steps, freeing the slot of
  whatever the policy evicts (no copies per token);
- ``ScoredDynamicCache``: per key/value head, the tokens a scored policy keeps (token loop);
- ``DenseCache``: transformers' ``DynamicCache``, nothing evicted (the dense baseline).

All three answer the same accounting questions (``KVAccounting``).
"""

from .accounting import KVAccounting
from .dynamic import DenseCache, EvictingDynamicCache, EvictingDynamicLayer
from .scored import ScoredDynamicCache, ScoredDynamicLayer
from .static import EvictingStaticCache, EvictingStaticLayer

__all__ = [
    "KVAccounting", "DenseCache", "EvictingDynamicCache", "EvictingDynamicLayer", "EvictingStaticCache",
    "EvictingStaticLayer", "ScoredDynamicCache", "ScoredDynamicLayer",
]
