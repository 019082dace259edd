"""The command lines: one module per ``tools/<name>.py`` script (which only calls its ``main``)
and per console script of setup.py, so installing the package installs every tool."""
