"""LLM annotation for ONI: a persistent label store, an annotator HTTP service, backends, and the learner's client.

Data flow::

    learner --(new unique messages)--> AnnotatorClient --HTTP--> server --> LabelStore (SQLite, pending work)
                                                                   |--> backend (OpenAI-compatible / embedded)
    learner <--(new labels, polled)--- AnnotatorClient <--HTTP---- server <-- LabelStore (results)

Nothing here blocks the learner: the client talks to the service from a background thread.
"""
from jaxrl_pref.annotation.store import LabelStore

__all__ = ["LabelStore"]
