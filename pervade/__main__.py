import sys

from pervade.cli import main

sys.exit(main())
