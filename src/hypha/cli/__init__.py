"""Command line interface (``hypha``): the only code that reads argv or calls ``trio.run``
for a role.

``main.py`` declares the commands and their flags, ``runner.py`` runs a role (config,
logging, signals, error lines), ``up.py`` draws ``hypha up``'s live view over
``hypha.local``. Entry points: ``hypha`` (``[project.scripts]``) and ``python -m hypha``.
"""
