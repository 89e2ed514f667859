from medistill.cli import main

raise SystemExit(main())
