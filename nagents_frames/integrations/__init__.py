"""Integrations with other engines, each imported only when used (the engines are optional extras).

- :mod:`nagents_frames.integrations.ray`: Ray Data, for work that outgrew one machine
  (``pip install 'nagents-frames[ray]'``).

Importing this package imports none of the engines::

    >>> import nagents_frames.integrations  # no ray import happens here
"""

from __future__ import annotations

__all__: list[str] = []
