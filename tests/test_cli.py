"""cli.py's failures: every one a single `error: ...` line naming what to change, exit status 2,
never a traceback (--debug keeps it), checked before any model is loaded or folder written."""
import pytest
import torch

import cli


def run_cli(capsys, *args):
    status = cli.main([str(arg) for arg in args])
    err = capsys.readouterr().err.strip()
    return status, err


BAD_MEMORIZE = [
    (("--epochs", 0), "--epochs must be at least 1 (got 0)"),
    (("--epochs", -1), "--epochs must be at least 1 (got -1)"),
    (("--poems", 0), "--poems must be at least 1 (got 0)"),
    (("--poems", -1), "--poems must be at least 1 (got -1)"),
    (("--eval-every", 0), "--eval-every must be at least 1 (got 0)"),
    (("--checkpoint-every", -1), "--checkpoint-every must be 0 or more (got -1)"),
    (("--log-every", 0), "--log-every must be at least 1 (got 0)"),
    (("--lr", 0), "--lr must be a finite number above 0 (got 0.0)"),
    (("--lr", -1), "--lr must be a finite number above 0 (got -1.0)"),
    (("--max-grad-norm", 0), "--max-grad-norm must be a finite number above 0 (got 0.0)"),
    (("--max-grad-norm", -1), "--max-grad-norm must be a finite number above 0 (got -1.0)"),
    (("--warmup-steps", -1), "--warmup-steps must be 0 or more (got -1)"),
    (("--micro-batch-tokens", 0), "--micro-batch-tokens must be at least 1 (got 0)"),
    (("--micro-batch-tokens", 512), "--micro-batch-tokens 512 exceeds --batch-tokens 256"),
    (("--betas", 0.9, 1.0), "--betas must be in [0, 1) (got 0.9 1.0)"),
    (("--weight-decay", -0.1), "--weight-decay must be a finite number, 0 or more (got -0.1)"),
    (("--device", "tpu"), "--device 'tpu' is not a device"),
]


@pytest.mark.parametrize("args,message", BAD_MEMORIZE, ids=[" ".join(map(str, a)) for a, _ in BAD_MEMORIZE])
def test_memorize_arguments_are_checked_first(capsys, tmp_path, args, message):
    status, err = run_cli(capsys, "memorize", "--model", "tiny-qwen2", "--out", tmp_path / "run", *args)
    assert status == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(capsys, tmp_path):
    for command in (["memorize"], ["eval", "--out", tmp_path / "eval"]):
        status, err = run_cli(capsys, *command, "--model", "tiny-qwen2", "--device", "cuda")
        assert status == 2 and err.startswith("error: --device cuda: torch sees no CUDA GPU") and "--device cpu" in err


def test_eval_poems_are_checked(capsys, tmp_path):
    status, err = run_cli(capsys, "eval", "--model", "tiny-qwen2", "--poems", 0, "--out", tmp_path)
    assert (status, err) == (2, "error: --poems must be at least 1 (got 0)")


def test_debug_keeps_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="--lr must be a finite number above 0"):
        cli.main(["memorize", "--model", "tiny-qwen2", "--lr", "0", "--debug"])


def test_an_unexpected_exception_is_one_line_too(capsys, monkeypatch):
    import engine.train
    monkeypatch.setattr(engine.train, "memorize", lambda config: {}["missing"])
    status, err = run_cli(capsys, "memorize", "--model", "tiny-qwen2")
    assert status == 2 and err.startswith("error: KeyError: 'missing'") and "--debug" in err and "\n" not in err


def test_a_checkpoint_write_failure(capsys, tmp_path, monkeypatch, one_thread):
    import engine.runs

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(engine.runs.torch, "save", refuse)
    status, err = run_cli(capsys, "memorize", "--model", "tiny-qwen2", "--poems", 2, "--epochs", 1,
                          "--format", "plain", "--out", tmp_path / "run")
    last = err.splitlines()[-1]                 # the progress bar's line comes before it
    assert status == 2 and "Traceback" not in err
    assert last.startswith(f"error: cannot write the checkpoint {tmp_path / 'run' / 'checkpoint-1'} (Permission denied)")
    assert "--resume" in last
