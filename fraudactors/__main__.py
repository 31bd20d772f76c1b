from fraudactors.cli import main

raise SystemExit(main())
