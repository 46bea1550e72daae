"""``python -m resnet_serve_client``: the same as the ``resnet-serve-client`` command."""

import sys

from .cli import main

sys.exit(main())
