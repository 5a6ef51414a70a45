import os
import sys

# The runner forks pg_ctl, servers and agents while gRPC threads run: gRPC's fork
# handlers then abort the child ("Check failure"). Children exec at once and need none.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from chaos.run import main

sys.exit(main())
