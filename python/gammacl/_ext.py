"""Placeholder, replaced by the extension loader."""


def available(cuda: bool = False) -> tuple[bool, str]:
    return False, "the C++ extension is not built in this tree yet"


def load(cuda: bool = False):
    raise RuntimeError("the C++ extension is not built in this tree yet")
