"""stm-agent: training-free recognition of molecules in STM scans, run as a service beside the microscope.

Packages: ``agent`` (domain objects, pipeline, daemon, CLI), ``adapters`` (files, .sxm, ZeroMQ,
storage), ``models`` (encoders), ``config`` (YAML defaults).
"""

__version__ = "0.1.0"
