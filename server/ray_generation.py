"""The cluster-wide store generation of loraplex on Ray Serve: a counter of the changes made to
the shared adapter store (a small named actor), which the ingresses read for every call they
forward and bump after every change that may have reached the store, and by which a replica
knows when to re-read the store (see server/ray_serve.py). A counter that is lost and started
again begins a new epoch, which makes every replica re-read the store once.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, NamedTuple

import ray

log = logging.getLogger(__name__)

GENERATION_ACTOR = "loraplex-store-generation"


class Generation(NamedTuple):
    epoch: str  # the counter's incarnation
    changes: int  # store changes counted in it


UNKNOWN = Generation(epoch="", changes=0)  # the counter cannot be reached: re-read every time


@ray.remote(num_cpus=0, max_restarts=-1)
class StoreGeneration:
    """A counter of store changes, shared by the ingress replicas. A restarted counter starts
    a new epoch, which makes every replica re-read the store once."""

    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex
        self.value = 0

    def bump(self) -> Generation:
        self.value += 1
        return Generation(self.epoch, self.value)

    def get(self) -> Generation:
        return Generation(self.epoch, self.value)


def generation_actor() -> Any:
    """The cluster's counter, started if there is none."""
    return StoreGeneration.options(  # type: ignore[attr-defined]
        name=GENERATION_ACTOR, namespace="loraplex", get_if_exists=True, lifetime="detached"
    ).remote()


class Generations:
    """An ingress's side of the counter, shared by its gRPC and HTTP front ends."""

    def __init__(self) -> None:
        self.counter = generation_actor()

    async def current(self) -> Generation:
        """What a forwarded call carries to its replica; UNKNOWN when no counter answers."""
        try:
            # Whatever the counter hands back (a counter of an older release: a plain tuple).
            return Generation(*await self.counter.get.remote())
        except ray.exceptions.RayActorError:  # gone for good: a new counter (a new epoch)
            log.warning("the store generation counter was lost: starting a new one")
            self.counter = generation_actor()
            try:
                return Generation(*await self.counter.get.remote())
            except ray.exceptions.RayActorError:
                return UNKNOWN

    async def bump(self) -> None:
        """Count a change that may have reached the store (callers shield it: a change whose
        answer was cancelled is counted all the same)."""
        try:
            await self.counter.bump.remote()
        except ray.exceptions.RayActorError:  # the next request starts a new epoch
            log.warning("the store generation counter was lost: starting a new one")
            self.counter = generation_actor()
