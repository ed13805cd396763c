import sys

from tinygpt.commands.cli import main

sys.exit(main())
