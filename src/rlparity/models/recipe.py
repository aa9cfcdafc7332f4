"""What a bundled model is built from, hashed.

Two hashes identify a build:

* the recipe hash covers everything the build consumes: the spec (config, language seed, training
  recipe), the tokenizer file, the first training batch and the evaluation batch (so a change to the
  synthetic language shows), and BUILDER_VERSION. It is the same on every machine, names the cache
  folder, and must equal the one recorded in fixtures/models/hashes.json.
* the weights hash is the SHA-256 of model.safetensors. Training is deterministic on one machine and
  software stack (one thread, deterministic algorithms: repeated builds and any OMP_NUM_THREADS give
  the same bytes), but float32 matrix products are summed in an order that depends on the kernel the
  CPU selects and on the torch version, and a few hundred optimiser steps carry those last-bit
  differences into every weight. Measured on the recording machine (AMD EPYC, AVX-512): forcing
  ATEN_CPU_CAPABILITY=avx2 or =default, or MKL_CBWR=COMPATIBLE, each gave different weights bytes. So
  the weights hash is checked bitwise against the cache's own manifest (corruption), and against the
  recorded one only where the build environment (torch, transformers, CPU model and capability) is the
  recorded one.
"""

import hashlib
import json

from rlparity.models.language import Language
from rlparity.models.specs import ModelSpec
from rlparity.models.tokenizer import build_tokenizer

# Bump when initialisation, training or the files written change what a recipe builds.
BUILDER_VERSION = 1


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def language_of(spec: ModelSpec) -> Language:
    return Language(spec.config["vocab_size"], spec.language_seed)


def recipe_hash(spec: ModelSpec) -> str:
    language = language_of(spec)
    training = spec.training
    first_batch = next(language.batches(training.data_seed, training.batch, training.seq_len))
    eval_batch = next(language.batches(training.eval_seed, training.batch, training.seq_len))
    payload = {
        "builder_version": BUILDER_VERSION,
        "spec": spec.as_dict(),
        "tokenizer_sha256": sha256_bytes(build_tokenizer(language.tokens).to_str().encode()),
        "data_sha256": sha256_bytes(canonical_json([first_batch, eval_batch])),
    }
    return sha256_bytes(canonical_json(payload))
