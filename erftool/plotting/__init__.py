"""Figures for erftool: each module draws one kind of figure and returns a matplotlib Figure.

Nothing here computes ERFs; callers pass numpy maps and numbers, so every figure can be
tested on synthetic data.
"""
from ._style import FORMATS, png_bytes, save
from .growth import growth_figure
from .heatmaps import comparison_grid, object_centre_comparison, overlay
from .profiles import mass_radius, profiles_figure, radial_profile
from .sampling import sampling_figure
from .scaling import correlation, scaling_figure
from .speed import speed_figure

__all__ = ["FORMATS", "save", "png_bytes", "comparison_grid", "overlay",
           "object_centre_comparison", "profiles_figure", "radial_profile", "mass_radius",
           "sampling_figure", "scaling_figure", "correlation", "growth_figure", "speed_figure"]
