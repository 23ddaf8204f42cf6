"""Real-QuPath test harness (``harness.py``) and its Java sources (``java/``); see harness.py."""
