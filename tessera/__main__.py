import sys

from tessera.cli.main import main

status = main()
if "torch.distributed" in sys.modules:  # a run that may have joined a process group ends through it
    from tessera.distributed.env import exit_process

    exit_process(status)
sys.exit(status)
