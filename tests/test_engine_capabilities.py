"""Engine capability checks see through the engine pool's proxy (parity.sides.Guarded).

Python 3.12 made isinstance on runtime-checkable Protocols look methods up statically, so a proxy that
forwards through __getattr__ read as an engine without hidden_states: on a Python 3.12 GPU machine every
parity pair failed its preflight. On Python 3.11 the old check passed too; these pin the behaviour.
"""

import torch

from rlparity.engines import captures, routes
from rlparity.parity.semantics import trainer_scores
from rlparity.parity.sides import Guarded


class _Capturing:
    name = "capturing"

    def hidden_states(self, token_ids):
        return {"logits": torch.arange(len(token_ids) * 3, dtype=torch.float32).reshape(len(token_ids), 3)}


class _Plain:
    name = "plain"


def test_capabilities_seen_through_the_pool_proxy():
    assert captures(Guarded(_Capturing(), side=None, pool=None))
    assert not routes(Guarded(_Capturing(), side=None, pool=None))
    assert not captures(Guarded(_Plain(), side=None, pool=None))
    assert not captures(object())


def test_trainer_scores_accepts_a_proxied_trainer():
    scored = trainer_scores(Guarded(_Capturing(), side=None, pool=None), [[1, 2, 3, 4]], [2])
    assert scored.logits[0].dtype == torch.float64
    assert scored.logits[0].shape == (4, 3)
