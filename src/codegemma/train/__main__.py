"""`python -m codegemma.train ...` = `codegemma train ...`; the module form torchrun launches.

torchrun --nproc-per-node 2 -m codegemma.train --config run.toml --parallel fsdp

Errors go through `codegemma.cli.main` as for `codegemma train`: each rank prints
`codegemma train: error: <message>` and exits with code 2 (CODEGEMMA_DEBUG=1 shows the traceback).
"""

import sys

from codegemma.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
