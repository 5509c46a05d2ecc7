"""``python -m drift_engine.assets``: where the shipped files are; with a name, print that
file (``python -m drift_engine.assets train.toml > train.toml`` writes a copy to edit)."""

import sys

from drift_engine.assets import NAMES, asset_path
from drift_engine.errors import DriftError

if len(sys.argv) > 1:
    try:
        path = asset_path(sys.argv[1])
    except DriftError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if path.is_file():
        sys.stdout.write(path.read_text(encoding="utf-8"))
    else:
        print(path)
else:
    for name in NAMES:
        print(f"{name}\t{asset_path(name)}")
