import sys

from payment_grpc.cli import main

sys.exit(main())
