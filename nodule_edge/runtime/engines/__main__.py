"""``python -m nodule_edge.runtime.engines``: print the README's backend table from the backend table.

Paste the output between the ``backend-table`` markers in README.md ("Engines and deployment");
``tests/runtime/engines/test_backends.py`` fails while the two differ.
"""

import sys

from nodule_edge.runtime.engines.backends import backend_table_markdown

sys.stdout.write(backend_table_markdown())
