"""hvd.elastic for collective.horovod.torch: not available until collective's elastic machinery exists."""
from __future__ import annotations

from typing import Any

__all__ = ["ElasticSampler", "ObjectState", "State", "TorchState", "run"]

_WHY = ("hvd.elastic is not supported by collective.horovod yet: it needs collective's elastic recovery "
        "(collective-run --elastic, RanksLostError, comm.shrink), which this version does not provide; "
        "run without elastic, or restart the job from a checkpoint")


def run(func: Any) -> Any:
    """Horovod's elastic decorator; raises NotImplementedError (see the module docstring)."""
    raise NotImplementedError(_WHY)


class State:
    """Horovod's elastic state base; constructing one raises NotImplementedError."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(_WHY)


class ObjectState(State):
    """Horovod's elastic object state; constructing one raises NotImplementedError."""


class TorchState(ObjectState):
    """Horovod's elastic torch state; constructing one raises NotImplementedError."""


class ElasticSampler:
    """Horovod's elastic sampler; constructing one raises NotImplementedError."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(_WHY)
