"""bench/bench_common.py: published results (bench/results/) are never written from a dirty tree unless told."""

import subprocess

import pytest

from bench.bench_common import guard_results


def _repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "bench" / "results").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    for cmd in (
        ["init", "-q"],
        ["add", "code.py"],
        ["-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "c"],
    ):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True)
    return repo


def test_dirty_tree_refuses_published_results_only(tmp_path, capsys):
    repo = _repo(tmp_path)
    published = str(repo / "bench" / "results" / "x.json")
    guard_results(published, str(repo))  # clean: fine
    (repo / "code.py").write_text("x = 2\n")
    with pytest.raises(SystemExit) as e:
        guard_results(published, str(repo))
    assert e.value.code == 2 and "uncommitted changes" in capsys.readouterr().err
    guard_results(published, str(repo), allow_dirty=True)  # told
    guard_results(str(tmp_path / "elsewhere.json"), str(repo))  # not a published result
    guard_results(None, str(repo))


def test_results_of_an_earlier_run_do_not_make_the_tree_dirty(tmp_path):
    """The demo then the cpu preset from one clone: the demo's results files change no code (found when the cpu
    preset refused to run after the demo had written bench/results/e2e-demo.*)."""
    from bench.bench_common import machine

    repo = _repo(tmp_path)
    (repo / "bench" / "results" / "x.json").write_text("{}")
    subprocess.run(["git", "-C", str(repo), "add", "bench/results/x.json"], check=True)
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "r"], check=True
    )
    (repo / "bench" / "results" / "x.json").write_text('{"new": 1}')
    published = str(repo / "bench" / "results" / "y.json")
    guard_results(published, str(repo))  # results only: fine
    assert not machine(str(repo))["git"].endswith("+uncommitted")
    (repo / "code.py").write_text("x = 3\n")
    with pytest.raises(SystemExit):
        guard_results(published, str(repo))
    assert machine(str(repo))["git"].endswith("+uncommitted")
