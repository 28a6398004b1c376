"""blurd: a daemon that anonymizes the photos and videos dropped into watched folders."""

__version__ = "0.1.0"
