"""`python -m train [flags]`: see `python -m train --help`.

Exit codes: 0 done; 1 the run stopped after it started (a non-finite loss, gradient or weight, or
outputs that could not be written: the message says where this run's weights are kept); 2 bad
input, found before any work (nothing written); 130 interrupted (the last checkpoint stays intact).
"""
from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers + DataLoader fork warning
    from .quiet import quiet_start

    quiet_start()  # before anything imports bitsandbytes
    from .config import parse_args

    cfg = parse_args(argv)  # argparse exits 2 itself on unknown flags / bad choices
    from .errors import TrainError, TrainFailed, TrainInterrupted
    from .loop import run

    try:
        run(cfg)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # while loading, before this run wrote anything
        print("\ninterrupted before training started; this run wrote nothing to --output-dir", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
