"""`tern demo`: a whole fleet on one machine, every part talking real MQTT on loopback."""

from demo.run import DemoResult, run_demo

__all__ = ["DemoResult", "run_demo"]
