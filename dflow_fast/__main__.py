"""``python -m dflow_fast``: the ``dflow-fast`` command line."""
import sys

from .apps.cli import main

sys.exit(main())
