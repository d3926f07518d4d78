"""How many intra-op threads a piece of linear algebra gets: one for small problems, torch's setting otherwise.

A QR of a 1280×40 factor or a rank-16 randomized SVD takes milliseconds on one core. Split over torch's
threads, each call waits at barriers for a partner thread; when another process (a training daemon, a
second merge) holds the other cores, that partner is descheduled and every barrier costs a scheduler time
slice. The SVD merge of the 128 SD1.5 attention modules took 0.3 s on one thread and 12–40 s on two
next to a busy process (`python -m benchmarks lowrank` measures it). A big problem (a full SVD of a large
dense matrix) keeps torch's threads: there the work between barriers outweighs the waits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Problems below this many floating-point operations (about 0.1 s on one core) run on one thread: an idle
# machine would gain at most that from more threads, a busy one loses many times it.
SMALL_FLOPS = 1e9


@contextmanager
def threads_for(flops: float) -> Iterator[None]:
    """Run the block on one intra-op thread when it does fewer than `SMALL_FLOPS` operations; the thread
    count is restored afterwards, also when the block raises. Nested blocks only ever lower the count."""
    before = torch.get_num_threads()
    if flops >= SMALL_FLOPS or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
