"""`python -m broker [--host H] [--port P] [--config FILE]`: the embedded broker."""

from broker.cli import main

raise SystemExit(main())
