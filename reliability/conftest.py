"""The fault-injection, bad-input and repetition suite (`nox -s reliability`): real faults on real components, each
with an expected outcome and a bound on the time to report it. It shares the `micro` fixtures of rlparity's tests."""

import os

from hypothesis import settings

from tests.conftest import engine_sequences, hf_micro, micro_checkpoint, reference_micro  # noqa: F401 (fixtures)

# Generated bad input (hypothesis): "ci" runs a few hundred inputs per property, derandomized so that CI draws the same
# inputs on every run (a failure reproduces from the printed profile alone); HYPOTHESIS_PROFILE=explore draws anew.
settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=1000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    profile = settings.default
    return (f"hypothesis profile {os.environ.get('HYPOTHESIS_PROFILE', 'ci')!r}: max_examples={profile.max_examples}, "
            f"derandomize={profile.derandomize} (seed fixed per test)")
