"""Files shipped inside the package and found through ``importlib.resources``, so they work
from an installed wheel as well as from the source tree:

* ``guess-model/``: the demo's tiny reference policy (Llama weights, word-level tokenizer,
  chat template; built by ``scripts/build_toy_model.py``),
* ``guess-problems/train.jsonl``, ``guess-problems/eval.jsonl``: the demo's split of the
  toy problems (``--env guess``),
* ``train.toml``: the example training configuration (every section, DRIFT's values).

``python -m drift_engine.assets`` lists them with their paths.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from drift_engine.errors import ConfigError

NAMES = (
    "guess-model",
    "guess-problems/train.jsonl",
    "guess-problems/eval.jsonl",
    "train.toml",
)


def asset_path(name: str) -> Path:
    """The filesystem path of the shipped file or folder ``name`` (one of ``NAMES``)."""
    if name not in NAMES:
        raise ConfigError(f"no shipped asset {name!r}; the assets are {', '.join(NAMES)}")
    resource = resources.files(__name__).joinpath(*name.split("/"))
    if not isinstance(resource, Path):
        # A zip import: model loaders need real folders. pip always installs a directory.
        raise ConfigError(
            f"drift_engine is imported from an archive ({resource}); install it with pip so "
            "that its shipped files are ordinary files"
        )
    return resource
