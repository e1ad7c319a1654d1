"""Start a syncfed worker: ``python run_websocket_server.py --id alice --port 8777``."""

import sys

from syncfed.cli.worker import main

if __name__ == "__main__":
    sys.exit(main())
