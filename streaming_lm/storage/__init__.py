"""Cache storage: how keys and values are held, named after transformers' ``cache_utils``.

- ``EvictingDynamicCache``: grows while a stream is read, then trims to the policy's ``held`` set
  after every pass (the token loop and the chunked path);
- ``EvictingStaticCache``: preallocated slots for one-token decode steps, freeing the slot of
  whatever the policy evicts (no copies per token);
- ``ScoredDynamicCache``: per key/value head, the tokens a scored method keeps, or a method whose heads hold
  different tokens (token loop, scored chunked path);
- ``ContextCache`` (in streams/context.py, the context regime's one module): every token until the one event of
  ``evict_every=context``, then what it kept;
- ``DenseCache``: transformers' ``DynamicCache``, nothing evicted (the dense baseline).

All of them answer the same accounting questions and expand to a batch alike (``KVAccounting``).
"""

from .accounting import KVAccounting
from .dynamic import DenseCache, EvictingDynamicCache, EvictingDynamicLayer
from .scored import ScoredDynamicCache, ScoredDynamicLayer
from .static import EvictingStaticCache, EvictingStaticLayer

__all__ = [
    "KVAccounting", "DenseCache", "EvictingDynamicCache", "EvictingDynamicLayer", "EvictingStaticCache",
    "EvictingStaticLayer", "ScoredDynamicCache", "ScoredDynamicLayer",
]
