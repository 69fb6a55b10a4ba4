"""`python -m codegemma.train ...` = `codegemma train ...`; the module form torchrun launches.

torchrun --nproc-per-node 2 -m codegemma.train --config run.toml --parallel fsdp
"""

import sys

from codegemma.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
