"""The omnicache command: demo and eval run end to end and write their files; bad
arguments give one line on stderr and a non-zero exit, never a traceback."""

import json
import shlex
import subprocess
import sys

import pytest

from omnicache.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "omnicache.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,needle", [
    (["eval", "--policy", "nope"], "invalid choice: 'nope'"),
    (["eval", "--policy", "fora", "--steps", "x"], "invalid int value"),
    (["eval", "--policy", "fora", "--steps", "0", "--samples", "2"], "steps"),
    (["eval", "--policy", "fora", "--set", "interval=abc", "--steps", "4", "--samples", "2"], "interval"),
    (["eval", "--policy", "fora", "--set", "bogus=1", "--steps", "4", "--samples", "2"], "bogus"),
    (["eval", "--policy", "fora", "--compute-fraction", "1.5", "--steps", "4", "--samples", "2"], "compute-fraction"),
    (["demo", "--samples", "0"], "--samples"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_one_line_no_traceback(args, needle):
    proc = run_cli(*args)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert needle in err


def test_eval_writes_json_with_the_uncached_row(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--policy", "fora", "--policy", "fbcache", "--set", "interval=2",
                 "--steps", "6", "--samples", "4", "--json", str(out)]) == 2  # fbcache has no interval
    assert main(["eval", "--policy", "fora", "--set", "interval=2", "--steps", "6", "--samples", "4",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [r["policy"] for r in rows] == ["uncached", "fora(interval=2)"]
    keys = {"policy", "config", "compute_fraction", "tflops", "wall_s", "speedup", "psnr", "ssim", "class_acc"}
    assert all(keys <= set(r) for r in rows)
    assert rows[0]["compute_fraction"] == 1.0 and rows[1]["compute_fraction"] < 1.0
    assert rows[0]["class_acc"] == 1.0  # uncached digits are recognised (classifier input range)
    assert rows[1]["config"]["interval"] == 2
    assert "fora(interval=2)" in capsys.readouterr().out


def test_eval_tunes_a_dynamic_threshold_to_the_compute_fraction(tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "--policy", "fbcache", "--compute-fraction", "0.6", "--steps", "10",
                 "--samples", "4", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"][1]
    assert abs(row["compute_fraction"] - 0.6) <= 0.03, row


def test_demo_writes_grid_and_table(tmp_path, capsys):
    assert main(["demo", "--steps", "8", "--samples", "3", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "demo.json").read_text())
    names = [r["policy"].split("(")[0] for r in data["results"]]
    assert names == ["uncached", "fora", "delta-dit", "teacache", "fbcache", "taylorseer", "omnicache", "l2c",
                     "l2c+gamma"]  # no L2C plan ships for 8 steps: the demo trained a router
    png = (tmp_path / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speedup" in capsys.readouterr().out


def test_train_default_command_writes_a_loadable_model(tmp_path, capsys):
    """``omnicache train-default``: the CLI parses, the trainer trains (a few steps of a small
    model here), exit status 0, and the record names the command that made it."""
    from omnicache.runtime.default import default_info, load_default

    args = ["--steps", "3", "--classifier-steps", "2", "--batch-size", "8", "--hidden-size", "32", "--depth", "2",
            "--sample-steps", "2", "--eval-samples", "2", "--threads", "1", "--out-dir", str(tmp_path)]
    assert main(["train-default", *args]) == 0
    info = default_info(tmp_path)
    assert info["training"]["command"] == "omnicache train-default " + shlex.join(args)
    assert info["training"]["args"]["steps"] == 3 and "out_dir" not in info["training"]["args"]
    assert load_default(data_dir=tmp_path).config.depth == 2
    assert "class accuracy of guided samples" in capsys.readouterr().out


@pytest.mark.parametrize("flag, field", [("--steps", "steps"), ("--batch-size", "batch_size"),
                                         ("--eval-samples", "eval_samples")])
def test_train_default_refuses_non_positive_counts(flag, field, capsys):
    from omnicache.train_default import DefaultTrainingSettings

    with pytest.raises(SystemExit) as stop:
        main(["train-default", flag, "0"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"omnicache train-default: error: {flag} must be positive"
    with pytest.raises(ValueError, match=f"^{field} must be positive"):
        DefaultTrainingSettings(**{field: 0})
