"""mg-ray: distributed HPO of a fused RGB+pose prototype model for micro-gesture classification."""

__version__ = "0.1.0"
