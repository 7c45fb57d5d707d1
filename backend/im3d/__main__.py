from im3d.cli import main

raise SystemExit(main())
