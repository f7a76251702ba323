"""`python -m train [flags]`: see `python -m train --help`. Exit codes: 0 done, 2 bad input,
130 interrupted (the last checkpoint stays intact)."""
from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers + DataLoader fork warning
    from .config import parse_args

    cfg = parse_args(argv)  # argparse exits 2 itself on unknown flags / bad choices
    from .loop import TrainInterrupted, run
    from .models import TrainError

    try:
        run(cfg)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the loop started (loading): no checkpoint was touched
        print("\ninterrupted before training started; nothing in --output-dir was changed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
