"""`python -m broker [--host H] [--port P] [--config FILE]`: the embedded broker."""

from broker.embedded import main

raise SystemExit(main())
