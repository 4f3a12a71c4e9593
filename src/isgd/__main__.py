from isgd.cli import main

raise SystemExit(main())
