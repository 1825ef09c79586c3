"""Mask + source series -> RTSTRUCT dataset (rt-utils, wrapped and corrected). Being written."""
