"""``python -m latteflow ...`` runs the ``latteflow`` command line."""
import sys

from .cli import main

sys.exit(main())
