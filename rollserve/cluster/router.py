"""Which replica runs a request: consistent hashing on the prompt's first blocks, bounded by load.

A request goes whole to one replica (its `n` samples share the prompt's KV blocks,
so the prompt is prefilled once). Its key is the token ids of the prompt's first
`prefix_blocks` KV blocks: prompts that share them (a system prompt, the same
prompt at the next training step) land on the same replica, whose prefix cache
then holds them. Walking the hash ring from the key, the first replica that can
take the request without exceeding `load_factor` times the mean outstanding
tokens gets it (consistent hashing with bounded loads); an idle replica always
can. Pure Python, no Ray: the cluster tells it which replicas are alive and
what each has outstanding.
"""

import bisect
import hashlib
import struct

_POINTS_PER_REPLICA = 64  # ring points per replica: keys spread evenly, few move when a replica leaves


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class Router:
    """Picks a replica per request and keeps each replica's outstanding tokens.

    `cost` of a request: its prompt tokens plus every token it may generate (`n * max_tokens`).
    """

    def __init__(self, num_replicas: int, block_size: int, prefix_blocks: int = 1, load_factor: float = 1.25):
        if not isinstance(prefix_blocks, int) or isinstance(prefix_blocks, bool) or prefix_blocks < 1:
            raise ValueError(f"prefix_blocks={prefix_blocks!r} is invalid: must be an int >= 1")
        if not isinstance(load_factor, (int, float)) or isinstance(load_factor, bool) or load_factor < 1:
            raise ValueError(f"load_factor={load_factor!r} is invalid: must be a number >= 1 "
                             f"(the most outstanding tokens a replica takes, as a multiple of the mean)")
        self.key_tokens = block_size * prefix_blocks
        self.load_factor = float(load_factor)
        self.loads = [0] * num_replicas  # outstanding tokens per replica
        ring = sorted((_hash(struct.pack("<qq", replica, point)), replica)
                      for replica in range(num_replicas) for point in range(_POINTS_PER_REPLICA))
        self._points = [h for h, _ in ring]
        self._owners = [r for _, r in ring]

    def key(self, token_ids: list[int]) -> int:
        head = token_ids[:self.key_tokens]
        return _hash(struct.pack(f"<{len(head)}q", *head))

    def preferred(self, token_ids: list[int], alive: set[int]) -> list[int]:
        """The alive replicas in ring order from this prompt's key (the first is where its prefix lives)."""
        start = bisect.bisect(self._points, self.key(token_ids))
        order: list[int] = []
        for i in range(len(self._owners)):
            replica = self._owners[(start + i) % len(self._owners)]
            if replica in alive and replica not in order:
                order.append(replica)
                if len(order) == len(alive):
                    break
        return order

    def choose(self, token_ids: list[int], cost: int, alive: set[int]) -> int:
        """The replica for a request (its cost is added to that replica's load); `alive` must not be empty."""
        order = self.preferred(token_ids, alive)
        bound = self.load_factor * (sum(self.loads[r] for r in alive) + cost) / len(alive)
        chosen = next((r for r in order if self.loads[r] == 0 or self.loads[r] + cost <= bound),
                      min(order, key=lambda r: self.loads[r]))
        self.loads[chosen] += cost
        return chosen

    def done(self, replica: int, cost: int) -> None:
        self.loads[replica] -= cost
