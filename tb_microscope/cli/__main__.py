"""`python -m tb_microscope.cli`: the same as `tb-microscope`."""

import sys

from .parser import main

sys.exit(main())
