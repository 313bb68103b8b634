"""Default configuration of stm-agent (``default.yaml``, read with ``agent.config.load_config``)."""
