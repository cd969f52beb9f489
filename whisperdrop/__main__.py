from whisperdrop.cli.commands import main

raise SystemExit(main())
