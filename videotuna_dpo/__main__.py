import sys

from videotuna_dpo.cli import main

sys.exit(main())
