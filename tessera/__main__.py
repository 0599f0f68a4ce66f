import sys

from tessera.core.cli import main

sys.exit(main())
