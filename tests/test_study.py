"""The study's protocol (issue 14): every contender gets the same sweep, is compared at its own best
setting and at the shared ones, and a contender can carry model settings (equal parameter counts)."""

from __future__ import annotations

import json

import pytest

from mlpmixer.cli import main
from mlpmixer.study import Contender, Setting, sweep

TINY = ["--batch-size", "8", "--max-val-windows", "20"]


def test_contender_specs_parse_and_name_their_folders():
    c = Contender.parse("attention:d_ff=32+pos_embedding=rotary+embed_scale=false")
    assert c.mixer == "attention" and c.fields() == {"d_ff": 32, "pos_embedding": "rotary", "embed_scale": False,
                                                     "token_mixer": "attention"}
    assert c.name == "attention:d_ff=32+pos_embedding=rotary+embed_scale=False" and "/" not in c.slug
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        Contender.parse("attention:d_ff")


def test_every_mixer_gets_the_same_sweep_with_the_positions_that_apply():
    grid = dict(lrs=(1e-3, 3e-3), warmups=(0.1,), positions=("seed", "unscaled", "rotary"))
    assert len(sweep(Contender("attention"), **grid)) == 6
    for mixer in ("mlp", "fourier", "gmlp"):
        settings = sweep(Contender(mixer), **grid)
        assert len(settings) == 4 and all(s.positions != "rotary" for s in settings)
    assert Setting(1e-3, 0.1, "seed").schedule().optimizer == "adamw"


def test_tuned_schedule_picks_each_contenders_best_on_validation(sonnet_file, tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["study", "mlm", "--steps", "4", "--seeds", "1", "--schedules", "seed,tuned", "--mixers",
            "mlp,attention:d_ff=16", "--tune-steps", "3", "--tune-lrs", "1e-3,3e-3", "--tune-positions",
            "seed,rotary", "--text-file", str(sonnet_file), "--out", str(out), *TINY]
    assert main(argv) == 0, capsys.readouterr().err
    table = (out / "study.md").read_text()
    assert "| tuned | mlp |" in table and "| tuned | attention:d_ff=16 |" in table and "| seed | mlp |" in table
    chosen_part, sweep_part = table.split("own best setting")[1].split("The sweep")
    rows = lambda part: [[c.strip() for c in line.split("|")[1:4]] for line in part.splitlines()  # noqa: E731
                         if line.startswith("| ") and "adamw lr" in line]
    sweep_rows, chosen = rows(sweep_part), {m: setting for m, setting, _ in rows(chosen_part)}
    assert len(sweep_rows) == 2 + 4, "mlp: 2 rates x seed positions; attention: 2 rates x (seed, rotary)"
    assert set(chosen) == {"mlp", "attention:d_ff=16"}
    for mixer, setting in chosen.items():
        best = max(float(v) for m, _, v in sweep_rows if m == mixer)
        assert [float(v) for m, s, v in sweep_rows if m == mixer and s == setting][0] == best, mixer
    tuned_runs = [p for p in out.iterdir() if p.name.startswith("tuned-attention")]
    config = json.loads((tuned_runs[0] / "config.json").read_text())
    assert config["model"]["d_ff"] == 16 and config["train"]["optimizer"] == "adamw"
    capsys.readouterr()
    assert main(argv) == 0 and "study: mlm" not in capsys.readouterr().out, "a rerun reuses every finished run"


def test_tuned_needs_a_tuning_budget(sonnet_file, tmp_path, capsys):
    assert main(["study", "mlm", "--schedules", "tuned", "--text-file", str(sonnet_file),
                 "--out", str(tmp_path / "s")]) == 2
    assert "needs --tune-steps" in capsys.readouterr().err


def test_report_only_reports_finished_runs_names_the_rest_and_trains_nothing(sonnet_file, tmp_path, capsys):
    out = tmp_path / "study"
    common = ["study", "mlm", "--steps", "3", "--schedules", "seed", "--text-file", str(sonnet_file),
              "--out", str(out), *TINY]
    assert main([*common, "--seeds", "1", "--mixers", "mlp"]) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main([*common, "--seeds", "2", "--mixers", "mlp,gmlp", "--report-only"]) == 0
    assert sorted(p.name for p in out.iterdir()) == before, "report-only trains nothing"
    table = (out / "study.md").read_text()
    assert "| seed | mlp | 1 |" in table and "| seed | gmlp |" not in table
    assert "Not finished yet" in table and "seed mlp seed 1" in table and "seed gmlp seed 0" in table
    assert main([*common, "--seeds", "1", "--mixers", "gmlp", "--report-only"]) == 2
    assert "nothing to report" in capsys.readouterr().err


def test_a_cell_another_process_trains_is_left_to_it(sonnet_file, tmp_path, capsys, monkeypatch):
    import mlpmixer.study as study
    from mlpmixer.runs import RunBusy

    real = study.train_cell

    def busy_for_seed_1(task, cell, *args, **kwargs):
        if cell.seed == 1:
            raise RunBusy(f"{cell.path} is being written by another mlpmixer process (PID 1)")
        return real(task, cell, *args, **kwargs)

    monkeypatch.setattr(study, "train_cell", busy_for_seed_1)
    out = tmp_path / "study"
    assert main(["study", "mlm", "--steps", "3", "--seeds", "2", "--schedules", "seed", "--mixers", "mlp",
                 "--text-file", str(sonnet_file), "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "seed 1: being trained by another process, left to it" in printed
    table = (out / "study.md").read_text()
    assert "| seed | mlp | 1 |" in table and "seed mlp seed 1" in table.split("Not finished yet")[1]
