"""Scheduler math on the host (float64), turned into the fused step op's coefficients."""
from .coefficients import ddim, dpmpp_2m, euler, euler_ancestral

__all__ = ["ddim", "dpmpp_2m", "euler", "euler_ancestral"]
