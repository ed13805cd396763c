import sys

from tinygpt.bench import main

sys.exit(main())
