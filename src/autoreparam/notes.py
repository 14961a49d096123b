"""Notes of the analysis and the planning: one line of text each, with a kind and the site it is about.

A ``Note`` is a ``str`` (it prints, compares and goes into JSON as its text); code that acts on
notes reads ``kind`` and ``site``, never the text.

>>> note = Note("site 'k' is discrete; it is held fixed", NoteKind.DISCRETE_SITE, site="k")
>>> note.kind.warns, note.site, note == "site 'k' is discrete; it is held fixed"
(True, 'k', True)
"""

from __future__ import annotations

import enum

__all__ = ["Note", "NoteKind"]


class NoteKind(enum.Enum):
    """What a note says. ``warns``: ``reparameterize`` repeats it as a warning."""

    NO_OBSERVED_SITE = "no observed site"  # no likelihood: funnels from the prior only
    DISCRETE_SITE = "discrete site"  # held fixed and left out of the analysis
    UNSTRUCTURED_TERM = "unstructured term"  # additive, but its invariances were not analysed
    NO_REAL_SUPPORT = "no real support"  # a site an offset would go to, left without offsets
    CANNOT_NONCENTRE = "cannot non-centre"  # a funnel of a family non-centring does not support
    GUARD_DROPPED = "dropped by the conditioning guard"
    GUARD_FAILED = "conditioning guard failed"  # the plan is unchecked
    NO_GAUSSIAN_BLOCK = "no Gaussian block"  # hybrid VI and collapsed MCMC do not apply
    FIGHTS_EXISTING = "fights an existing reparameterization"  # the model's own and the plan's disagree
    WITHIN_SITE = "direction inside one site"  # reported, not planned: offsets move one site along another
    OTHER = "other"

    @property
    def warns(self) -> bool:
        return self in (NoteKind.DISCRETE_SITE, NoteKind.NO_REAL_SUPPORT, NoteKind.CANNOT_NONCENTRE,
                        NoteKind.FIGHTS_EXISTING)


class Note(str):
    """The text of a note, with its ``kind`` and the ``site`` it is about (None: the model)."""

    kind: NoteKind
    site: str | None

    def __new__(cls, text: str, kind: NoteKind = NoteKind.OTHER, site: str | None = None) -> "Note":
        note = super().__new__(cls, text)
        note.kind, note.site = kind, site
        return note

    def __reduce__(self):
        return (Note, (str(self), self.kind, self.site))
