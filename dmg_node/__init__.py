"""dmg-node: a DICOM node that auto-contours diffuse midline glioma on MR.

Research software. Every RTSTRUCT it writes is AI-generated, unapproved and must be reviewed.
"""

__version__ = "0.1.0"
