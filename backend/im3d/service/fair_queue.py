"""Queued job ids, one FIFO per artist, served round-robin across artists.

The next job comes from the artist served least recently (an artist who has never been served, or
has waited longest since, goes first), so one artist's burst of jobs cannot starve the others.
It keeps the small part of `collections.deque`'s interface the job manager uses (append, remove,
len, iteration, clear), so it can stand in for the local executor's FIFO.
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterator

DEFAULT_ARTIST = ""  # jobs submitted without a per-artist token


class FairQueue:
    def __init__(self) -> None:
        self._queues: dict[str, collections.deque[str]] = {}
        self._artist_of: dict[str, str] = {}
        self._arrival: dict[str, int] = {}  # job id -> arrival number (ties between artists)
        self._last_served: dict[str, int] = {}  # artist -> serve number; never served: 0
        self._serves = 0
        self._arrivals = itertools.count(1)

    # -- deque-like
    def append(self, job_id: str, artist: str = DEFAULT_ARTIST) -> None:
        self._queues.setdefault(artist, collections.deque()).append(job_id)
        self._artist_of[job_id] = artist
        self._arrival[job_id] = next(self._arrivals)

    def remove(self, job_id: str) -> None:
        artist = self._artist_of.pop(job_id)  # KeyError like deque.remove's ValueError: a bug upstream
        self._arrival.pop(job_id, None)
        queue = self._queues[artist]
        queue.remove(job_id)
        if not queue:
            del self._queues[artist]

    def __len__(self) -> int:
        return len(self._artist_of)

    def __bool__(self) -> bool:
        return bool(self._artist_of)

    def __iter__(self) -> Iterator[str]:
        return iter(self.order())

    def clear(self) -> None:
        self._queues.clear()
        self._artist_of.clear()
        self._arrival.clear()

    # -- fair order
    def count(self, artist: str) -> int:
        return len(self._queues.get(artist, ()))

    def artist_of(self, job_id: str) -> str | None:
        return self._artist_of.get(job_id)

    def _next_artist(self, queues: dict[str, collections.deque[str]], last_served: dict[str, int]) -> str:
        return min(queues, key=lambda a: (last_served.get(a, 0), self._arrival[queues[a][0]]))

    def popleft(self) -> str:
        """The next job in fair order; IndexError when empty (like deque.popleft)."""
        if not self._queues:
            raise IndexError("pop from an empty FairQueue")
        artist = self._next_artist(self._queues, self._last_served)
        job_id = self._queues[artist].popleft()
        if not self._queues[artist]:
            del self._queues[artist]
        del self._artist_of[job_id]
        del self._arrival[job_id]
        self._serves += 1
        self._last_served[artist] = self._serves
        return job_id

    def order(self) -> list[str]:
        """Every queued id in the order it will be served if nothing else arrives."""
        queues = {a: collections.deque(q) for a, q in self._queues.items()}
        last_served = dict(self._last_served)
        serves = self._serves
        order = []
        while queues:
            artist = self._next_artist(queues, last_served)
            order.append(queues[artist].popleft())
            if not queues[artist]:
                del queues[artist]
            serves += 1
            last_served[artist] = serves
        return order

    def positions(self) -> dict[str, int]:
        """job id -> 1-based place in line."""
        return {job_id: place for place, job_id in enumerate(self.order(), 1)}


def queued_eta(position: int, workers: int, mean_job_s: float | None) -> float | None:
    """Seconds until a queued job at `position` (1 = next) is done, from the mean duration of recent
    jobs; None without history. The running jobs count as one whole round (a stated over-estimate
    rather than a guess at their progress), the jobs ahead are spread over the workers, then the
    job's own run."""
    if mean_job_s is None or workers < 1 or position < 1:
        return None
    rounds = 1 + (position - 1) // workers + 1
    return round(mean_job_s * rounds, 1)
