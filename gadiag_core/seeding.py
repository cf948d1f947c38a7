"""Seeds derived from what a unit of work *is*, never from execution order.

A continuation's seed comes from (run seed, question, rollout, node, token,
sample index), so a resumed or re-batched run draws the same tokens.
"""

import hashlib


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts: derive_seed(0, "L1-0003", 2) …"""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
