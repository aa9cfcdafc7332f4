"""The float64 GPT-OSS reference's building blocks against transformers' own, piece by piece."""

import math

import pytest
import torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm, apply_rotary_pos_emb

from rlparity.models import load_spec
from rlparity.models.config import normalise
from rlparity.reference.gpt_oss import CONFIG_KEYS, apply_rope, rms_norm, rope_cos_sin, yarn_frequencies

# transformers computes the YaRN frequencies in float32: they may differ from float64 by its rounding.
FLOAT32_RELATIVE_ROUNDING = torch.finfo(torch.float32).eps


def hf_yarn(config: dict):
    hf_config = AutoConfig.for_model(**config)
    return ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")


@pytest.mark.parametrize("truncate", [False, True], ids=["gpt_oss_no_truncate", "truncate"])
@pytest.mark.parametrize("original", [4096, 64], ids=["orig4096", "orig64"])
def test_yarn_frequencies_match_transformers(truncate, original):
    config = dict(load_spec("tiny").config)
    changed = {"truncate": truncate, "original_max_position_embeddings": original}
    config["rope_scaling"] = config["rope_scaling"] | changed
    yarn = normalise(config, "test")["rope_scaling"]
    inv_freq, scaling = yarn_frequencies(config["head_dim"], config["rope_theta"], yarn["factor"], yarn["beta_fast"],
                                         yarn["beta_slow"], yarn["original_max_position_embeddings"], yarn["truncate"])
    hf_inv_freq, hf_scaling = hf_yarn(config)
    assert scaling == pytest.approx(hf_scaling, rel=1e-15)
    torch.testing.assert_close(inv_freq, hf_inv_freq.double(), rtol=4 * FLOAT32_RELATIVE_ROUNDING, atol=0)


def test_yarn_interpolates_slow_dimensions_only():
    inv_freq, scaling = yarn_frequencies(64, 150000.0, 32.0, 32.0, 1.0, 4096, False)
    original = 1.0 / 150000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert torch.equal(inv_freq[:4], original[:4])  # fast dimensions keep their frequency
    torch.testing.assert_close(inv_freq[-4:], original[-4:] / 32)  # slow ones are divided by the factor
    assert scaling == pytest.approx(0.1 * math.log(32) + 1)


def test_rope_matches_transformers_rotation():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 10, 64, dtype=torch.float64), torch.randn(2, 2, 10, 64, dtype=torch.float64)
    inv_freq, scaling = yarn_frequencies(64, 150000.0, 32.0, 32.0, 1.0, 4096, False)
    cos, sin = rope_cos_sin(torch.arange(10), inv_freq, scaling, torch.float64)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(apply_rope(q, cos, sin), hf_q, rtol=0, atol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin), hf_k, rtol=0, atol=0)


def test_rms_norm_matches_transformers():
    torch.manual_seed(0)
    x, weight = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    norm = GptOssRMSNorm(16, eps=1e-5).double()
    norm.weight.data = weight
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), norm(x))


def test_reference_reads_only_declared_config_keys(reference_micro):
    from rlparity.reference.gpt_oss import forward

    config = {key: reference_micro.config[key] for key in CONFIG_KEYS}
    out = forward(config, reference_micro.weights, torch.tensor([[1, 30, 31, 40]]))
    assert out.logits.shape == (1, 4, reference_micro.config["vocab_size"])
    assert out.logits.dtype == torch.float64
