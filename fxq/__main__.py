import sys

from fxq.cli import main

sys.exit(main())
