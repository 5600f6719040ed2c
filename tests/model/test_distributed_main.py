"""``latteflow.distributed.run_main``: the torchrun entry-point skeleton of sample_ddp and train_ddp."""
import pytest

import latteflow.distributed as D


def _parser():
    p = D.MainParser(prog="tool")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=1)
    return p


@pytest.fixture
def shutdowns(monkeypatch):
    calls = []
    real = D.shutdown_distributed
    monkeypatch.setattr(D, "shutdown_distributed", lambda env: (calls.append(env), real(env)))
    return calls


def test_a_run_prints_its_summary_and_leaves_the_group(shutdowns, capsys):
    assert D.run_main(_parser(), ["--n", "3"], lambda args, env: f"did {args.n} on rank {env.rank}") == 0
    assert capsys.readouterr().out == "did 3 on rank 0\n"
    assert len(shutdowns) == 1


@pytest.mark.parametrize("error", [ValueError("bad --n"), TypeError("bad --n"), FileNotFoundError("bad --n")])
def test_bad_input_is_one_line_and_status_2(error, shutdowns, capsys):
    def body(args, env):
        raise error

    assert D.run_main(_parser(), [], body) == 2
    assert capsys.readouterr().err == "tool: error: bad --n\n"
    assert len(shutdowns) == 1


def test_other_errors_propagate_after_leaving_the_group(shutdowns):
    def body(args, env):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        D.run_main(_parser(), [], body)
    assert len(shutdowns) == 1


def test_a_bad_device_never_joins(shutdowns, capsys):
    assert D.run_main(_parser(), ["--device", "tpu"], lambda a, e: "unreached") == 2
    assert "tool: error: device must be" in capsys.readouterr().err and not shutdowns


def test_parser_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--n", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tool: error: argument --n") and len(err.strip().splitlines()) == 1
