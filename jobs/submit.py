"""Submit a job of ours to a running Ray cluster, stream its logs, exit with its status.

    python jobs/submit.py pretrain experiment=smoke --address http://HEAD:8265

The logic lives in moe_platform.cluster (see cluster/README.md); this file only
tells it where the repository is.
"""

import sys
from pathlib import Path

from moe_platform.cluster.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], project_root=Path(__file__).resolve().parents[1]))
