"""Run federated training: ``python run_websocket_client.py --spawn-workers``."""

import sys

from syncfed.cli.coordinator import main

if __name__ == "__main__":
    sys.exit(main())
