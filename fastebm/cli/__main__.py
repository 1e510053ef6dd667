"""``python -m fastebm.cli ...``: the ``fastebm`` command (torch.distributed.run re-enters here)."""
import sys

from fastebm.cli import main

sys.exit(main())
