"""The project's error hierarchy: one base class, one subclass per stage that can fail."""

from __future__ import annotations


class DmgNodeError(Exception):
    """Base class of every error dmg-node raises on purpose."""


class ConfigError(DmgNodeError):
    """The configuration file is unreadable or breaks a rule (the message names key and file)."""


class ReceiveError(DmgNodeError):
    """The Storage SCP cannot start (its address is taken or does not exist here)."""


class InstanceTooLarge(DmgNodeError):
    """A received data set is over a configured size limit (``node.max_inflated_mb``)."""


class SpoolError(DmgNodeError):
    """An instance could not be stored durably, or the index is inconsistent."""


class SeriesError(DmgNodeError):
    """A series cannot be turned into one volume (the message gives the reason)."""


class ModelError(DmgNodeError):
    """A model is missing, invalid, or does not match its manifest."""


class RtStructError(DmgNodeError):
    """An RTSTRUCT could not be built from a mask and its source series."""


class JobInterrupted(DmgNodeError):
    """The node is stopping: the job stops at a series boundary and is requeued."""


class SegError(DmgNodeError):
    """A DICOM Segmentation could not be built from a mask and its source series."""


class InferenceUnavailable(DmgNodeError):
    """The remote inference service did not answer (unreachable, timed out, not deployed).

    Not a failure of the study: the job goes back to the queue without counting an attempt and is
    retried with backoff until the service answers.
    """
