"""Put this folder on sys.path so the pass tests can import their shared helpers."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
