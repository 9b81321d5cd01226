"""The exceptions vattn raises; `VattnError` is the base of all of them."""

from __future__ import annotations


class VattnError(Exception):
    """Base class of every error raised by vattn."""


class OutOfPages(VattnError):
    """Not enough physical pages for the request; the cache is left exactly as it was.

    Recoverable: free a slot, `trim()`, or retry after pending pages are released.
    """

    def __init__(self, needed: int, available: int, what: str = "pages") -> None:
        self.needed = needed
        self.available = available
        self.what = what
        super().__init__(f"out of physical {what}: needed {needed}, available {available}")

    def __reduce__(self) -> tuple[type[OutOfPages], tuple[int, int, str]]:
        """Pickled with its fields (to cross a process boundary)."""
        return type(self), (self.needed, self.available, self.what)


class OutOfSlots(VattnError):
    """Every slot (batch index) is in use; the cache is left exactly as it was."""


class InvalidArgument(VattnError, ValueError):
    """A caller mistake, raised before anything is changed; the message names what was
    expected and what was given."""


class Unsupported(VattnError, NotImplementedError):
    """An operation vattn refuses by design (it would need data copied or moved that the
    virtual layout keeps in place); nothing was changed."""


class DriverError(VattnError):
    """A virtual-memory driver call failed; partial work of the operation was undone."""

    def __init__(self, call: str, code_name: str, detail: str = "") -> None:
        self.call = call
        self.code_name = code_name
        self.detail = detail
        suffix = f": {detail}" if detail else ""
        super().__init__(f"{call} failed with {code_name}{suffix}")

    def __reduce__(self) -> tuple[type[DriverError], tuple[str, str, str]]:
        """Pickled with its fields (to cross a process boundary)."""
        return type(self), (self.call, self.code_name, self.detail)
