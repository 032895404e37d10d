"""`make demo` runs fusecc.demo: a small run must check out (exit 0, prints the comparison)."""

from fusecc import demo


def test_demo_small(capsys):
    assert demo.main(["--num-models", "2", "--batch", "1", "--res", "32", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "max abs error vs the 2 models run one by one" in out and "check: OK" in out
