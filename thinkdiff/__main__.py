import sys

from thinkdiff.cli import main

sys.exit(main())
