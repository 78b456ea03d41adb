"""Old import path of :mod:`lmcache.serde.wire_format` (the wire layouts belong with serde).

``from lmcache.storage.connectors import wire_format`` and
``import lmcache.storage.connectors.wire_format`` give the very same module object.
"""

import sys

from lmcache.serde import wire_format as _wire_format

sys.modules[__name__] = _wire_format
