#!/usr/bin/env python
"""Convert the released "DeMansia 2 Tiny EMA.ckpt" into a zoo checkpoint (the code is models/demansia2/convert.py).

    python checkpoints/convert_demansia2.py "DeMansia 2 Tiny EMA.ckpt" checkpoints/demansia2_tiny_released.ckpt
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.demansia2.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
