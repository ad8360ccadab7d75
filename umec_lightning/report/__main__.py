"""`python -m umec_lightning.report <dir>`."""

import sys

from . import main

sys.exit(main())
