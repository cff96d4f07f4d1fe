"""Sub-commands of ``facelens`` that live beside the package they drive.

Each module here calls :func:`facelens.cli.register_command` on import; :func:`facelens.cli.build_parser`
imports them all. Keep module-level imports light: import torch and models inside the handler.
"""
