from influence_tui.cli import main

raise SystemExit(main())
