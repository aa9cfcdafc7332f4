"""A user's engine: a plain transformers model behind rlparity's engine protocol.

    cd docs/engines
    rlparity check parity --a hf:float32 --b mine:float32 --engine mine=plain_transformers:PlainTransformersEngine

Its own forward, one sequence at a time, then log_softmax and gather. From rlparity it takes only the protocol's
types (Sampling, RAW); tests/test_user_engine_docs.py runs it through `rlparity check parity`.
"""

import torch
from transformers import AutoModelForCausalLM

from rlparity.engines import RAW, Sampling


class PlainTransformersEngine:
    dtypes = ("float32", "bfloat16")  # asked for another dtype, rlparity skips the side with this reason

    def __init__(self, checkpoint, *, dtype=torch.float32, max_len=None):
        # eager attention: what transformers runs GPT-OSS's sinks with on any device
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="eager")
        self.model.eval()

    def logprobs(self, token_ids, prompt_len, sampling: Sampling = RAW) -> list[torch.Tensor]:
        """log p(token_t | tokens_<t) for t = prompt_len .. len - 1 of each sequence: raw, or processed at a
        temperature (log_softmax(z / T)); top-k and top-p are not implemented here."""
        if sampling.logprobs == "processed" and (sampling.top_k or sampling.top_p < 1):
            raise NotImplementedError("top-k and top-p log-probs are not implemented by this engine")
        temperature = sampling.temperature if sampling.logprobs == "processed" else 1.0
        values = []
        with torch.no_grad():
            for ids, prompt in zip(token_ids, prompt_len):
                ids = torch.tensor([list(ids)])
                logits = self.model(input_ids=ids).logits[0].float()  # [S, V]
                # the logits at position t - 1 predict token t
                logp = torch.log_softmax(logits[prompt - 1 : -1] / temperature, dim=-1)  # [S - prompt, V]
                values.append(logp.gather(-1, ids[0, prompt:, None])[:, 0])
        return values
