"""Run wanengine from a checkout without installing the console script: `python cli.py i2v ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wanengine.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
