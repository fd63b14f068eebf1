"""Every console script's main lives in kdx.cli, and loading kdx.cli imports neither torch nor the layers the mains
call (they are imported when a command runs), so `--help` and argument errors answer quickly."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kdx import cli

ROOT = Path(__file__).resolve().parents[1]
ARGPARSE_MAINS = {"kdx-report": "report_main", "kdx-eval": "eval_main", "kdx-pack": "pack_main",
                  "kdx-export": "export_main"}


def test_every_console_script_is_a_main_of_kdx_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(ARGPARSE_MAINS) <= set(scripts)
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module == "kdx.cli", f"{name} points at {target}, not at kdx.cli"
        assert callable(getattr(cli, function)), f"{name}: kdx.cli has no {function}"
    for name, function in ARGPARSE_MAINS.items():
        assert scripts[name] == f"kdx.cli:{function}"


def test_loading_kdx_cli_imports_no_torch_and_no_layer_a_main_calls():
    code = ("import sys, kdx.cli; heavy = ['torch', 'pytorch_lightning', 'kdx.train', 'kdx.report', 'kdx.export', "
            "'kdx.eval', 'kdx.data']; print(','.join(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("name", ["kdx-report", "kdx-pack", "kdx-eval"])
def test_argparse_mains_answer_help_and_bad_arguments_with_their_own_name(name, capsys):
    main = getattr(cli, ARGPARSE_MAINS[name])
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: {name}")
    with pytest.raises(SystemExit) as e:
        main([])  # a required argument is missing: argparse's usage error, exit code 2
    assert e.value.code == 2 and f"{name}: error:" in capsys.readouterr().err


def test_kdx_pack_error_is_one_sentence_naming_the_folder(tmp_path, capsys):
    missing = tmp_path / "no_such_faces"
    assert cli.pack_main([str(missing), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdx-pack: error:") and str(missing) in err and err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_errors_raised_after_composition_are_not_explained_as_composition_errors():
    """A job's own OmegaConf/Hydra error (e.g. a value that fails to resolve while training) passes through
    _run_hydra_main as it is; the same error from composition becomes kdx's one-sentence explanation."""
    import pytest
    from omegaconf.errors import InterpolationResolutionError

    from kdx import cli

    @cli._after_composition
    def job(cfg):
        raise InterpolationResolutionError("a value the job resolved")

    with pytest.raises(InterpolationResolutionError, match="a value the job resolved"):
        cli._run_hydra_main(lambda: job(None), "train")
    with pytest.raises(SystemExit) as stopped:  # unmarked: treated as a composition error, one sentence, exit 2
        cli._run_hydra_main(lambda: (_ for _ in ()).throw(InterpolationResolutionError("while composing")), "train")
    assert stopped.value.code == 2
