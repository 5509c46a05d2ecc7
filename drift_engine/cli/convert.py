"""``drift-engine convert``: the DRIFT reference's rollout JSONL to rollouts.safetensors."""

from __future__ import annotations

import click

from drift_engine.cli.options import weighting_options
from drift_engine.errors import ConfigError
from drift_engine.weighting_config import from_gamma_beta


@click.command("convert")
@click.argument("input_path", metavar="IN.jsonl", type=click.Path(dir_okay=False))
@click.option(
    "--tokenizer",
    "tokenizer_name",
    required=True,
    help="Tokenizer (local path or Hugging Face id) of the model that sampled the rollouts.",
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(),
    help="Output rollouts file (*.safetensors).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (refused without it).")
@weighting_options(
    effect="also stores returns and weights",
    unset="no weights are stored (train computes them)",
)
@click.option("--reference-model", default=None, help="Recorded in the file's metadata.")
@click.option(
    "--max-shard-mb",
    type=float,
    default=None,
    help="Split the output into shards of at most this many MB.",
)
def convert(
    input_path: str,
    tokenizer_name: str,
    out_path: str,
    gamma: float | None,
    beta: float | None,
    reference_model: str | None,
    max_shard_mb: float | None,
    overwrite: bool,
) -> None:
    """Import the DRIFT reference's rollout JSONL (IN.jsonl) into a rollouts file.

    Conversations are tokenised with the tokenizer's chat template, assistant turns are
    marked, rewards and penalties are kept. With --gamma and/or --beta (the other taking
    its default, 0.7 / 0.2) the returns and importance weights are stored as well, computed
    as the reference's weight_sft.py computes them.
    """
    from drift_engine.convert import convert_reference_jsonl
    from drift_engine.data.rollouts import check_output_file, save_rollouts
    from drift_engine.rollout import load_tokenizer

    if max_shard_mb is not None and max_shard_mb <= 0:
        raise ConfigError(f"--max-shard-mb must be positive, got {max_shard_mb}")
    if not out_path.endswith(".safetensors"):
        raise ConfigError(f"--out must end in .safetensors, got {out_path!r}.")
    check_output_file(out_path, overwrite=overwrite)
    weighting = from_gamma_beta(gamma, beta)
    tokenizer = load_tokenizer(tokenizer_name)
    rollouts, report = convert_reference_jsonl(
        input_path, tokenizer, weighting=weighting, reference_model=reference_model
    )
    max_bytes = None if max_shard_mb is None else int(max_shard_mb * 1024 * 1024)
    written = save_rollouts(out_path, rollouts, max_shard_bytes=max_bytes)
    click.echo(report.summary())
    if weighting is not None:
        click.echo(f"weights stored (gamma={weighting.gamma}, beta={weighting.beta})")
    click.echo("wrote " + ", ".join(str(p) for p in written))
