"""The ``tnlit`` subcommands, one module each (``report``, ``compress``, ``quickstart``, ``inspect``); ``parsing``
turns a command's function into its parser, and :mod:`tnlit.cli` assembles them into the ``tnlit`` command."""
