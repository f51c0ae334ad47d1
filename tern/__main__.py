from tern.cli import main

raise SystemExit(main())
