"""The example engine of docs/engines (a plain transformers model behind the protocol) passes
`rlparity check parity` against the trainer on `micro`, run the way its README says: from its folder."""

from pathlib import Path

import pytest

from rlparity.cli import main
from rlparity.parity import calibrate, parity_batch
from rlparity.parity.floors import save_floors
from rlparity.results import read_records

pytestmark = pytest.mark.usefixtures("forget_user_engines")

DOCS_ENGINES = Path(__file__).parents[1] / "docs" / "engines"


@pytest.fixture
def micro_floors(micro_checkpoint, tmp_path):
    entry = calibrate("micro", micro_checkpoint, parity_batch("micro"), dtypes=("float32",), log=lambda message: None)
    return save_floors(entry, tmp_path / "noise_floors.json")


def test_the_documented_engine_passes_check_parity(micro_checkpoint, micro_floors, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RLPARITY_CACHE", str(micro_checkpoint.parent.parent))
    monkeypatch.chdir(DOCS_ENGINES)
    results = tmp_path / "parity.jsonl"
    status = main(["check", "parity", "--a", "hf:float32", "--b", "mine:float32",
                   "--engine", "mine=plain_transformers:PlainTransformersEngine",
                   "--model", "micro", "--floors", str(micro_floors), "--results", str(results)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "[ok] log-probs [raw]: mine[float32] returns what was asked" in out
    assert "[ok] log-probs [processed T=0.7]: mine[float32] returns what was asked" in out
    preflight_record, pair_record = read_records(results)
    assert [preflight_record["verdict"], pair_record["verdict"]] == ["pass", "pass"]
    assert pair_record["subject"] == "hf[float32] vs mine[float32]" and pair_record["extra"]["floor"] == "cross"
