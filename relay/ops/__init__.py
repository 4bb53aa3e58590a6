"""Operations: how the relay is run and watched.

``service.py`` is the Windows service shell (pywin32, imported only on Windows); the metrics,
health and status HTTP endpoint and webhook alerts live beside it. Nothing here is on the hot
path: the relay's stages never import this package.
"""
