"""hvd.elastic for collective.horovod.torch: each entry raises NotImplementedError saying what to use instead.

Horovod's elastic mode needs collective's elastic recovery (``collective-run
--elastic``, ``RanksLostError``, ``comm.shrink``), which this version does not
provide. A fixed-size job that checkpoints covers the same ground: it restarts
from the last checkpoint instead of continuing on fewer ranks.
"""
from __future__ import annotations

from typing import Any

__all__ = ["ElasticSampler", "ObjectState", "State", "TorchState", "run"]

_WHY = ("hvd.elastic.{what} is not supported by collective.horovod: elastic training needs collective's elastic "
        "recovery (collective-run --elastic), which this version does not provide. Instead, run a fixed-size job "
        "(collective-run -np N ...) that checkpoints and restarts: {instead}")
_CHECKPOINT = ("every few steps rank 0 saves model.state_dict() and optimizer.state_dict() with torch.save; after a "
               "restart rank 0 loads them and every rank calls hvd.broadcast_parameters(model.state_dict(), "
               "root_rank=0) and hvd.broadcast_optimizer_state(optimizer, root_rank=0)")


def _unsupported(what: str, instead: str) -> NotImplementedError:
    return NotImplementedError(_WHY.format(what=what, instead=instead))


def run(func: Any) -> Any:
    """Horovod's elastic decorator; raises NotImplementedError naming the replacement.

    Instead: call the training function directly, with a state restored from a
    checkpoint and broadcast from rank 0 (see the module docstring).
    """
    raise _unsupported("run", "call the training function directly instead of decorating it; " + _CHECKPOINT)


class State:
    """Horovod's elastic state base; constructing one raises NotImplementedError naming the replacement."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise _unsupported(type(self).__name__, "in place of state.commit() and state.restore(), " + _CHECKPOINT)


class ObjectState(State):
    """Horovod's elastic object state; constructing one raises NotImplementedError naming the replacement."""


class TorchState(ObjectState):
    """Horovod's elastic torch state; constructing one raises NotImplementedError naming the replacement."""


class ElasticSampler:
    """Horovod's elastic sampler; constructing one raises NotImplementedError naming the replacement."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise _unsupported("ElasticSampler", "shard the data with torch.utils.data.distributed.DistributedSampler("
                                             "dataset, num_replicas=hvd.size(), rank=hvd.rank()) and call its "
                                             "set_epoch(epoch) each epoch; to resume mid-epoch, save the epoch and "
                                             "step with the checkpoint and skip the batches already done")
