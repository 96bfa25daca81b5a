import sys

from dualsft.cli import main

sys.exit(main())
