"""`CacheStats`: what `VirtualKVCache.stats()` reports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class CacheStats:
    """A snapshot of a cache's memory; page counts are physical pages."""

    page_size_bytes: int
    """Bytes per physical page."""
    active_slots: int
    """Slots owned by requests."""
    idle_slots_with_pages: int
    """Freed slots that still hold pages (deferred reclamation)."""
    pages_mapped: int
    """Pages mapped in slots, active and idle."""
    pages_idle: int
    """Of `pages_mapped`, those held by idle slots."""
    pages_ahead: int
    """Of `pages_mapped`, those active slots hold beyond their last target and read slack
    (look-ahead, and pages inherited from a freed slot)."""
    pages_pending: int
    """Pages waiting for their fence before they are unmapped."""
    pages_free: int
    """Pages created and sitting in the pool."""
    pages_created: int
    """Pages that exist (mapped + pending + free), not counting the anchor page."""
    memory_limit_bytes: int
    """Cap on physical memory, the anchor page included."""
    physical_bytes: int
    """Physical memory held now, the anchor page included."""
