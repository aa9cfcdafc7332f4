"""python -m rlparity.models: the documented way to build and locate the bundled models."""

import json

from rlparity.models.__main__ import main


def test_list_names_every_model(capsys):
    assert main(["list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"micro", "tiny"} <= set(names)


def test_path_and_stats_of_a_cached_model(micro_checkpoint, capsys):
    cache = str(micro_checkpoint.parent.parent)
    assert main(["path", "micro", "--cache", cache]) == 0
    assert capsys.readouterr().out.strip() == str(micro_checkpoint)
    assert main(["stats", "micro", "--cache", cache, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert 0 < stats["mean_max_prob"] < 1 and len(stats["layers"]) == 2


def test_bad_name_is_an_error_not_a_traceback(capsys):
    assert main(["build", "huge"]) == 2
    assert "unknown bundled model 'huge'" in capsys.readouterr().err
