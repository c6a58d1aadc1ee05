"""What every job runs on: its configuration (dataclass + YAML + ``key=value``), progress lines, and the Ray
actor pool and resumable stages (``*_ray.py``)."""
