"""`python -m fxclip ...`: see fxclip/cli.py."""
import sys

from .cli import main

sys.exit(main())
