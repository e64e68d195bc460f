from resnet_imagenet.cli import main

raise SystemExit(main())
