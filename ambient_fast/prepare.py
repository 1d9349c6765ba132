"""`python -m ambient_fast.prepare`: turn images into a corrupted data set, import corrupted data,
or verify a data set. The command lives in ambient_fast.data.prepare; see its docstring."""
import sys

from ambient_fast.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
