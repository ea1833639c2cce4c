"""``python -m fxprune``: the same light launcher as the ``fxprune`` console script."""
import sys

from .launcher import main

sys.exit(main())
