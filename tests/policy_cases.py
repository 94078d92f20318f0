"""Instances of every registered policy for the tiny test model (2 layers, 4 query heads, 2 KV
heads): the conformance suite runs each one. A new policy must add its cases here;
``test_conformance.py`` fails, naming it, until it does."""

import numpy as np

# Retaining heads for the tiny model (2 layers, (4 + 2 * 2) * 16 input features, d_R = 8).
_rng = np.random.default_rng(0)
_HEADS = dict(w1=_rng.normal(0, 0.1, (2, 128, 8)).astype(np.float32),
              w2=_rng.normal(0, 0.3, (2, 8, 2)).astype(np.float32))

# Small hyperparameters, so eviction (or whatever the method does) really happens in a test.
SMALL = {
    "full": {},
    "streaming": dict(sink=2, window=5),
    "duo": dict(heads=((0,), (1,)), sink=2, window=5),
    "recycled": dict(topk=4, stride=3),
    "locret": dict(budget=6, stabilizers=2, chunk=4, decode_room=2, **_HEADS),
    "snapkv": dict(budget=6, stabilizers=2, chunk=4, decode_room=2, observation=3, pool=3),
    "retrieval": dict(sink=2, window=5, k=3),
}

# Options under which the method must equal full attention: a budget far beyond the 32-token
# caches of the checks (the cache is then cut to 32 slots).
UNLIMITED = {
    "full": {},
    "streaming": dict(sink=2, window=10_000),
    "duo": dict(heads=((0,), (1,)), sink=2, window=10_000),
    "recycled": dict(topk=4, stride=1),  # every step a full step
    "locret": dict(budget=10_000, stabilizers=2, chunk=4, **_HEADS),
    "snapkv": dict(budget=10_000, stabilizers=2, chunk=4),
    "retrieval": dict(sink=2, window=5, k=10_000),  # every host key retrieved
}

# Options that must be refused with a LongctxError (beyond an unknown option name).
BAD = {
    "full": [dict(prefill_kernel="bogus")],
    "streaming": [dict(window=0), dict(sink=-1), dict(positions="bogus"), dict(positions=1)],
    "duo": [dict(window=0), dict(sink=-1), dict(positions="bogus"), dict(retrieval_ratio=1.5),
            dict(retrieval_ratio=0.5, threshold=0.5), dict(heads=((0, 0), ())), dict(shards=0)],
    "recycled": [dict(topk=0), dict(topk=-0.5), dict(topk=2.5), dict(stride=0), dict(pool=2),
                 dict(pool=0), dict(ahead=-1), dict(similarity=1.5), dict(similarity=-2.0),
                 dict(check_every=0), dict(sink=-1), dict(recent=-1)],
    "locret": [dict(budget=0, **_HEADS), dict(budget=4, stabilizers=4, **_HEADS),
               dict(stabilizers=-1, **_HEADS), dict(chunk=0, **_HEADS),
               dict(decode_room=-1, **_HEADS), dict(heads="/nonexistent/heads.npz"),
               dict(positions="compact", **_HEADS)],
    "snapkv": [dict(budget=0), dict(budget=4, stabilizers=5), dict(chunk=0),
               dict(decode_room=-1), dict(observation=0), dict(pool=2), dict(positions="x")],
    "retrieval": [dict(sink=-1), dict(window=0), dict(k=0), dict(k=2.5), dict(index="bogus"),
                  dict(scan=0), dict(scan=1.5), dict(attend="gpu"), dict(train_queries=0),
                  dict(host_threads=-1), dict(host_threads=1.5)],
}
