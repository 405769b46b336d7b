"""The ``ipo`` command: runs the parts (``up``, ``serve``, ``worker``, ``migrate``), administers keys,
builds local models and data, and drives the API over HTTP (``files``, ``jobs``, ``demo``)."""
