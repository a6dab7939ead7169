"""`python -m mobile_harness BUILD_DIR`: checks a build folder against its manifest."""

import sys

from mobile_harness.manifest import main

sys.exit(main())
