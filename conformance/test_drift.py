"""The train-rollout mismatch does not drift over a run's steps, and an engine whose weight sync lags a step is
caught by that (rlparity.trainer.drift), in the metric names of slime, verl and NeMo-RL.

    in sync       the hf rollout engine synced every step: the mismatch stays at the first step's level
    lagging sync  a planted engine that keeps sampling with the weights of the sync before the last (while
                  reporting the last ones as loaded, so the sync verification cannot see it): the drift check fails

Both runs use the SFT'd tiny model, the hf rollout engine and a few small steps.
"""

from rlparity.results import FAIL, PASS, Record
from rlparity.trainer.config import TrainConfig
from rlparity.trainer.drift import DRIFT_METRIC, check_drift
from rlparity.trainer.hf_sampler import HFSampler
from rlparity.trainer.trainer import Trainer

SMALL = dict(prompts_per_step=4, group=4, eval_prompts=1, chunk_size=128)
STEPS = 3


class LaggingSampler(HFSampler):
    """Samples with the weights of the previous sync; state_dict() reports the latest ones (a sync acknowledged
    before it is applied)."""

    def __init__(self, checkpoint, temperature: float = 1.0):
        super().__init__(checkpoint, temperature)
        self.name = "hf-sampler-lagging-sync[eager,float32]"  # its run's records and plot lines are its own
        self.received = None

    def load_weights(self, weights):
        latest = {name: tensor.detach().clone() for name, tensor in weights.items()}
        super().load_weights(self.received if self.received is not None else latest)
        self.received = latest

    def state_dict(self):
        return self.received


def run(checkpoint, store, sampler_class) -> tuple[Trainer, list[dict]]:
    config = TrainConfig(steps=STEPS, **SMALL)
    trainer = Trainer(config, checkpoint, sampler_class(checkpoint, temperature=config.temperature), store,
                      log=lambda line: None)
    return trainer, trainer.train()


def test_mismatch_does_not_drift_in_sync(tiny_sft_checkpoint, recorder):
    trainer, history = run(tiny_sft_checkpoint, recorder.store, HFSampler)
    record = check_drift(history, trainer.subject, "float32")
    recorder.check(record, details=f"{DRIFT_METRIC} per step: {record.extra[DRIFT_METRIC]}")


def test_a_lagging_weight_sync_is_detected(tiny_sft_checkpoint, recorder):
    trainer, history = run(tiny_sft_checkpoint, recorder.store, LaggingSampler)
    lagging = check_drift(history, trainer.subject, "float32")
    detected = lagging.verdict == FAIL
    recorder.check(Record("trainer.lagging_sync_detected", f"{trainer.subject} (planted)",
                          lagging.case, "float32", PASS if detected else FAIL, error=lagging.error,
                          tolerance=lagging.tolerance,
                          reason="" if detected else "a weight sync lagging one step went unnoticed: "
                                                     f"{DRIFT_METRIC} per step {lagging.extra[DRIFT_METRIC]}",
                          extra=lagging.extra | {"drift_reason": lagging.reason}))
