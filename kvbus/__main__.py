import sys

from kvbus.cli import main

sys.exit(main())
