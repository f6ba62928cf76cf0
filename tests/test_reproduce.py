"""``xbt reproduce`` at its micro size: every experiment writes its section, its JSON and a real
figure, the tables come from the JSON, and the verdicts follow their rules."""
import json

import numpy as np
import pytest

from xbraid_transformers.app.cli import main
from xbraid_transformers.app.reproduce import EXPERIMENTS, write_report
from xbraid_transformers.app.reproduce.base import (CONFIRMED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURABLE,
                                                    fmt)

matplotlib = pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", "--micro", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_experiment_writes_json_a_figure_and_its_section(report_dir, name):
    record = json.loads((report_dir / f"{name}.json").read_text())
    experiment = EXPERIMENTS[name]
    image = matplotlib.image.imread(report_dir / record["figure"])
    assert image.ndim == 3 and image.shape[0] > 100
    pixels = image[..., :3].reshape(-1, 3)
    assert np.unique(pixels, axis=0).shape[0] > 20          # not blank: lines and text drawn
    report = (report_dir / "REPORT.md").read_text()
    # the section shows the table made from the JSON, and the verdict stored in it
    assert experiment.tables(record["result"]) in report
    assert f"**Verdict: {record['verdict']['label']}.** {record['verdict']['evidence']}" in report
    # the verdict is recomputed from the stored numbers by the experiment's rule
    assert experiment.verdict(record["result"]).as_dict() == record["verdict"]
    assert record["verdict"]["label"] in (CONFIRMED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURABLE)


def test_verdicts_follow_the_numbers(report_dir):
    """Change the measured numbers in a stored result and the verdict follows the stated rule."""
    record = json.loads((report_dir / "gradient-bias.json").read_text())
    result = record["result"]
    result["unigram_loss"] = 10.0          # every run counts as trained
    seeds = {seed: i for i, seed in enumerate(result["seeds"])}

    def set_losses(forward_heavy, mirror):
        for run in result["runs"]:
            fwd, bwd = map(int, run["scheme"].split(","))
            run["eval_loss"] = (forward_heavy if fwd > bwd else mirror) + 0.01 * seeds[run["seed"]]
        return EXPERIMENTS["gradient-bias"].verdict(result).label

    assert set_losses(2.0, 2.5) == CONFIRMED          # more forward iterations train better
    assert set_losses(2.5, 2.0) == CONTRADICTED
    assert set_losses(2.0, 2.0) == INCONCLUSIVE       # a tie
    result["unigram_loss"] = 1.0                      # no run beat the unigram loss
    assert set_losses(2.0, 2.5) == NOT_MEASURABLE


def test_report_is_rebuilt_from_the_json_files(report_dir):
    text = write_report(str(report_dir))
    report = open(text).read()
    for name, experiment in EXPERIMENTS.items():
        assert f"(`{name}`)" in report
    assert fmt(0.5) == "0.5"


def test_unknown_experiment_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--micro", "--only", "nope", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "unknown experiment" in capsys.readouterr().err
