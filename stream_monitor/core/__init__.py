"""stream_monitor.core: statistics, windows and their evaluation: pure, no I/O."""
