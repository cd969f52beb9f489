from whisperdrop.cli import main

raise SystemExit(main())
