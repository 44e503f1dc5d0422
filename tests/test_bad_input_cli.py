"""Issue 15, the command line as a demanding user or an attacker would use it: every bad
argument is refused before any slow work, with exit status 2, one line on stderr that
names the argument, no traceback, and no file created, changed or removed."""

import os
import subprocess
import sys

import pytest
import torch

from omnicache.policies import FORAConfig

resource = pytest.importorskip("resource", reason="RLIMIT_FSIZE needs a POSIX system")


def run_cli(cwd, *args, preexec_fn=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "omnicache.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=env, preexec_fn=preexec_fn, timeout=600)


def snapshot(root):
    """Every path under ``root`` with its kind, size, mtime and content."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            data = open(path, "rb").read() if os.path.isfile(path) else None
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, data)
    return out


@pytest.fixture
def work(tmp_path):
    """A folder with a good plan, a file and a folder in it; the CLI runs there."""
    FORAConfig(interval=2).plan(2, 8).save(tmp_path / "good.json")
    (tmp_path / "file.txt").write_text("keep me\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "inside.txt").write_text("keep me too\n")
    return tmp_path


SMALL = ["--steps", "2", "--samples", "2"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")

CASES = [
    # 4: the device, checked before loading anything
    pytest.param(["eval", "--policy", "fora", "--device", "cuda", *SMALL], "--device cuda", marks=NO_CUDA,
                 id="eval-cuda"),
    pytest.param(["calibrate", "--policy", "omnicache", "--compute-fraction", "0.5", "--steps", "2",
                  "--device", "cuda", "--out", "new.json"], "--device cuda", marks=NO_CUDA, id="calibrate-cuda"),
    pytest.param(["train-router", "--steps", "2", "--iters", "1", "--device", "cuda", "--out", "new.json"],
                 "--device cuda", marks=NO_CUDA, id="train-router-cuda"),
    pytest.param(["eval", "--policy", "fora", "--device", "meta", *SMALL], "--device meta", id="eval-meta"),
    pytest.param(["demo", "--device", "bogus", *SMALL, "--out", "demo"], "--device bogus", id="demo-bogus"),
    # 4: output paths, checked before the first sampling run
    pytest.param(["eval", "--policy", "fora", *SMALL, "--json", "folder"], "--json folder", id="json-folder"),
    pytest.param(["eval", "--policy", "fora", *SMALL, "--json", "file.txt/out.json"], "--json file.txt/out.json",
                 id="json-under-file"),
    pytest.param(["demo", *SMALL, "--out", "file.txt"], "--out file.txt", id="demo-out-file"),
    pytest.param(["eval", "--policy", "omnicache", "--set", "plan_path=folder", *SMALL], "plan_path: CachePlan: folder",
                 id="plan-path-folder"),
    pytest.param(["eval", "--policy", "omnicache", "--set", "plan_path=missing.json", *SMALL],
                 "plan_path=missing.json", id="plan-path-missing"),
    pytest.param(["eval", "--policy", "l2c", "--set", "plan_path=good.json", "--steps", "3", "--samples", "2"],
                 "plan_path=good.json", id="plan-path-wrong-steps"),
    pytest.param(["calibrate", "--policy", "omnicache", "--compute-fraction", "0.5", "--steps", "2",
                  "--out", "folder"], "--out folder", id="calibrate-out-folder"),
    pytest.param(["train-router", "--steps", "2", "--iters", "1", "--out", "file.txt/plan.json"],
                 "--out file.txt/plan.json", id="train-router-out-under-file"),
    # 5: guidance
    pytest.param(["calibrate", "--policy", "omnicache", "--compute-fraction", "0.5", "--steps", "2",
                  "--guidance", "nan", "--out", "new.json"], "--guidance nan", id="calibrate-guidance-nan"),
    pytest.param(["train-router", "--steps", "2", "--iters", "1", "--guidance", "nan", "--out", "new.json"],
                 "--guidance nan", id="train-router-guidance-nan"),
    pytest.param(["eval", "--policy", "fora", "--guidance", "nan", *SMALL], "--guidance nan", id="eval-guidance-nan"),
    # 9: seeds torch cannot take
    pytest.param(["eval", "--policy", "fora", "--seed", str(2**70), *SMALL], f"--seed {2**70}", id="eval-seed"),
    pytest.param(["calibrate", "--policy", "omnicache", "--compute-fraction", "0.5", "--steps", "2",
                  "--seed", str(2**70), "--out", "new.json"], f"--seed {2**70}", id="calibrate-seed"),
]


@pytest.mark.parametrize("args, needle", CASES)
def test_refused_with_one_line_and_nothing_touched(work, args, needle):
    before = snapshot(work)
    proc = run_cli(work, *args)
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert needle in err, err
    assert snapshot(work) == before


def test_failed_plan_write_keeps_the_good_plan(work):
    """(ulimit -f 1; omnicache calibrate ... --out good.json): one line, the old plan intact."""
    before = snapshot(work)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))  # the new plan is larger

    proc = run_cli(work, "calibrate", "--policy", "omnicache", "--compute-fraction", "0.5", "--steps", "6",
                   "--samples", "2", "--out", "good.json", preexec_fn=limit)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and err[-1].startswith("omnicache calibrate: error:"), err[-1]
    assert "File too large" in err[-1]
    assert snapshot(work) == before


def test_eval_loads_plan_files_before_the_reference_run(work, monkeypatch, capsys):
    from omnicache import evaluate
    from omnicache.cli import main

    def no_run(self):
        raise AssertionError("the uncached reference run started before the plan file was checked")

    monkeypatch.setattr(evaluate.Bench, "__post_init__", no_run)
    import json

    plan = json.loads((work / "good.json").read_text())
    (work / "bad.json").write_text(json.dumps(dict(plan, version=1.0)))
    assert main(["eval", "--policy", "omnicache", "--set", f"plan_path={work / 'bad.json'}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("bad.json") == 1 and "--set plan_path" in err and "CachePlan.version" in err, err


def test_eval_labels_a_loaded_plan_by_what_it_holds(work):
    """A FORA plan given as OmniCache's plan_path is labelled as the FORA plan it is."""
    from omnicache.evaluate import policy_label
    from omnicache.policies import OmniCacheConfig

    assert policy_label(OmniCacheConfig(plan_path=str(work / "good.json"))) == "omnicache(plan=good.json)"
    assert policy_label(OmniCacheConfig(compute_fraction=0.5)) == "omnicache(compute_fraction=0.5)"
    proc = run_cli(work, "eval", "--policy", "omnicache", "--set", "plan_path=good.json", *SMALL,
                   "--json", "out/eval.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = json.loads((work / "out" / "eval.json").read_text())["results"]
    assert [r["policy"] for r in rows] == ["uncached", "FORA(plan=good.json)"]
