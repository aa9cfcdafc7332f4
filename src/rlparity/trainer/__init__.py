"""The reference RL trainer (GRPO / PPO-clip) on a multi-turn tool-use task; see rlparity.trainer.trainer."""
