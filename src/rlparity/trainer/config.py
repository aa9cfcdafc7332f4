"""What a training run is: algorithm, old-log-prob strategy, correction, engine and sizes, checked up front."""

from dataclasses import asdict, dataclass

from rlparity.errors import RlparityError
from rlparity.trainer.losses import CORRECTIONS, KL_ESTIMATORS

ALGOS = ("grpo", "ppo")
OLD_LOGPROB = ("recompute", "detach")
ENGINES = ("hf", "vllm")
VLLM_SYNCS = ("inplace", "restart")  # rlparity.trainer.vllm_sampler
# verl's default cap for truncated / masked importance sampling of rollout-vs-trainer ratios.
TIS_CAP = 2.0
# PPO's usual clip range (Schulman et al. 2017), also GRPO's.
CLIP_EPSILON = 0.2
# Gradient-norm clip, as the bundled models' own training (fixtures/models/*.json grad_clip).
GRAD_CLIP = 1.0


@dataclass(frozen=True)
class TrainConfig:
    # Defaults sized for the 2-core development machine: ~5-10 s a step on tiny with the hf engine. Measured there:
    # lr 5e-4 collapsed the reward within 10 steps (KL 0.5), 2e-4 stayed flat over 12, 1e-4 raised it over 30.
    steps: int = 60
    algo: str = "grpo"
    old_logprob: str = "detach"
    correction: str = "none"
    engine: str = "hf"
    vllm_sync: str = "inplace"
    model: str = "tiny"
    prompts_per_step: int = 16
    group: int = 8  # samples per prompt (GRPO's group)
    mini_batches: int | None = None  # None: 1 for grpo, 2 for ppo
    epochs: int | None = None  # None: 1 for grpo, 2 for ppo
    lr: float = 1e-4
    kl_coef: float = 0.01
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    clip_epsilon: float = CLIP_EPSILON
    correction_cap: float = TIS_CAP
    temperature: float = 1.0
    chunk_size: int = 256
    eval_prompts: int = 256  # held-out tasks: the before/after reward's standard error is ~0.025 at reward ~0.2
    seed: int = 0

    @property
    def resolved_mini_batches(self) -> int:
        return self.mini_batches if self.mini_batches is not None else (1 if self.algo == "grpo" else 2)

    @property
    def resolved_epochs(self) -> int:
        return self.epochs if self.epochs is not None else (1 if self.algo == "grpo" else 2)

    @property
    def on_policy(self) -> bool:
        """One mini-batch, one epoch: the single update is taken at exactly the policy that was sampled."""
        return self.resolved_mini_batches == 1 and self.resolved_epochs == 1

    def check(self) -> None:
        for field, value, allowed in (("algo", self.algo, ALGOS), ("old_logprob", self.old_logprob, OLD_LOGPROB),
                                      ("correction", self.correction, CORRECTIONS), ("engine", self.engine, ENGINES),
                                      ("vllm_sync", self.vllm_sync, VLLM_SYNCS),
                                      ("kl_estimator", self.kl_estimator, KL_ESTIMATORS)):
            if value not in allowed:
                raise RlparityError(f"train: {field} {value!r}, expected one of {allowed}")
        for field in ("steps", "prompts_per_step", "group", "resolved_mini_batches", "resolved_epochs", "chunk_size"):
            if getattr(self, field) < 1:
                raise RlparityError(f"train: {field} must be >= 1, got {getattr(self, field)}")
        if self.algo == "grpo" and self.group < 2:
            raise RlparityError(f"train: grpo needs a group of at least 2 samples per prompt, got {self.group}")
        batch = self.prompts_per_step * self.group
        if batch % self.resolved_mini_batches:
            raise RlparityError(f"train: {batch} episodes per step do not split into {self.resolved_mini_batches} "
                                f"mini-batches")
        if self.old_logprob == "detach" and not self.on_policy:
            raise RlparityError(
                f"train: old_logprob 'detach' reuses the training forward as the old policy, which is only right when "
                f"the update is strictly on-policy (1 mini-batch, 1 epoch); got {self.resolved_mini_batches} "
                f"mini-batches x {self.resolved_epochs} epochs: use old_logprob 'recompute'")
        if self.lr < 0:
            raise RlparityError(f"train: lr must be >= 0, got {self.lr}")

    def as_dict(self) -> dict:
        return asdict(self) | {"mini_batches": self.resolved_mini_batches, "epochs": self.resolved_epochs}
