"""Fair association admission for the Storage SCP (PS3.8 9.3.4, A-ASSOCIATE-RJ "local limit exceeded").

pynetdicom decides the limit by counting every live acceptor thread, including the ones still
negotiating or about to be rejected. When more senders than ``maximum_associations`` connect at
the same moment, each of them counts all the others and every one is refused, even those that
would have fitted. :class:`AdmittingAE` admits under a lock instead: the first
``maximum_associations`` acceptors to reach the check hold a slot until their thread ends (or
until they are rejected for another reason), and only the excess is refused.
"""

from __future__ import annotations

import threading
from typing import Any

from pynetdicom.association import Association

from dmg_node.net.gate import GatedAE


class AdmittingAE(GatedAE):
    """An AE whose acceptor-side association limit admits the first comers, never none of them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admission_lock = threading.Lock()
        self._admitted: set[Association] = set()

    @property
    def active_associations(self) -> list[Association]:
        """The live associations; for an acceptor thread that is negotiating, the admission decision.

        pynetdicom's ACSE asks this from the acceptor's own thread during negotiation and refuses
        when the acceptors counted exceed the limit. That call admits the thread if a slot is free
        and answers with the admitted acceptors (plus the caller when it is not admitted, so the
        count exceeds the limit). Every other caller gets the plain list.
        """
        assocs: list[Association] = super().active_associations
        me = threading.current_thread()
        if not (isinstance(me, Association) and me.is_acceptor and not me.is_established):
            return assocs
        with self._admission_lock:
            alive = set(assocs)
            self._admitted &= alive
            if me not in self._admitted and len(self._admitted) < self.maximum_associations:
                self._admitted.add(me)
            others = [a for a in assocs if not a.is_acceptor]
            counted = [*self._admitted] if me in self._admitted else [*self._admitted, me]
            return others + counted

    def release_slot(self, assoc: Association) -> None:
        """Give back the slot of an association that was rejected for another reason."""
        with self._admission_lock:
            self._admitted.discard(assoc)
